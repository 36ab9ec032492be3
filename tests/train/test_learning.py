"""The demo recipe learns: a shortened demo run on MUSE-layout synthetic files, scored on held-out scenes
by `pixellm eval`, must beat marking every shape for each target by a clear margin.

The run is the demo's (`configs/demo.yaml`, its model, recipe and batch shape) on fewer scenes and
steps. Both numbers come from the same `metrics.json`: the model's gIoU and `baseline_giou`, the gIoU
of predicting every target as the union of all shapes of its image. A model that ignores its prompts
(one blob for every target) scores about the baseline; one that learned nothing scores below it.
"""

import json
import os
import subprocess
import sys

import pytest

from pixellm_jax.data.synthetic_layout import write_synthetic_muse

pytestmark = pytest.mark.heavy  # ~6 min on 2 cores

STEPS = 700
MARGIN = 0.1


def _pixellm(args: list[str], cwd) -> None:
    """`pixellm ...` on one CPU device, as the demo runs (the test session simulates eight)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "pixellm_jax.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_a_short_demo_run_beats_marking_every_shape(tmp_path):
    write_synthetic_muse(tmp_path / "data", ["train", "val"], [600, 40], seed=0)
    spec = "muse:json=data/{}.json,images=data/images"
    _pixellm([
        "train", "--config", "demo", "train.output_dir=run", f"optim.total_steps={STEPS}", "train.eval_every=0",
        "train.save_every=0", "train.progress=false", "train.compilation_cache=''", "train.overlays=2",
        f"data.datasets=['{spec.format('muse_train')}', '{spec.format('refer_train')}']",
        f"data.val=['muse_val={spec.format('muse_val')},limit=10']",
    ], tmp_path)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["data"]["drop_fraction"] == 0.0
    _pixellm(["eval", "--checkpoint", "run/model", "--out", "scores", "--no-progress",
              "--split", f"refer={spec.format('refer_val')},protocol=teacher_forced"], tmp_path)
    refer = json.loads((tmp_path / "scores" / "metrics.json").read_text())["refer"]
    assert refer["targets"] == 80 and refer["baseline_giou"] is not None
    assert refer["giou"] > refer["baseline_giou"] + MARGIN, refer
