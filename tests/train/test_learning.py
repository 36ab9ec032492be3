"""The demo recipe learns: a shortened demo run on MUSE-layout synthetic files, scored on held-out scenes
by `pixellm eval`, must beat marking every shape for each target by a clear margin.

The run is the demo's (`configs/demo.yaml`, its model, recipe and batch shape) on fewer scenes and
steps. Both numbers come from the same `metrics.json`: the model's gIoU and `baseline_giou`, the gIoU
of predicting every target as the union of all shapes of its image. A model that ignores its prompts
(one blob for every target) scores about the baseline; one that learned nothing scores below it.
"""

import json

import pytest

from pixellm_jax.cli import main as cli_main
from pixellm_jax.data.synthetic_layout import write_synthetic_muse

pytestmark = pytest.mark.heavy  # ~4 min on 2 cores

STEPS = 700
MARGIN = 0.1


def test_a_short_demo_run_beats_marking_every_shape(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_synthetic_muse("data", ["train", "val"], [600, 40], seed=0)
    spec = "muse:json=data/{}.json,images=data/images"
    assert cli_main([
        "train", "--config", "demo", "train.output_dir=run", f"optim.total_steps={STEPS}", "train.eval_every=0",
        "train.save_every=0", "train.progress=false", "train.compilation_cache=''", "train.overlays=2",
        f"data.datasets=['{spec.format('muse_train')}', '{spec.format('refer_train')}']",
        f"data.val=['muse_val={spec.format('muse_val')},limit=10']",
    ]) == 0
    summary = json.loads(open("run/summary.json").read())
    assert summary["steps"] == STEPS and summary["data"]["drop_fraction"] == 0.0
    assert cli_main(["eval", "--checkpoint", "run/model", "--out", "scores", "--no-progress",
                     "--split", f"refer={spec.format('refer_val')},protocol=teacher_forced"]) == 0
    refer = json.loads(open("scores/metrics.json").read())["refer"]
    assert refer["targets"] == 80 and refer["baseline_giou"] is not None
    assert refer["giou"] > refer["baseline_giou"] + MARGIN, refer
