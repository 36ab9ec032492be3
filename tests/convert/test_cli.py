"""`pixellm convert` / `pixellm export` end to end on a tiny PixelLM release."""

from __future__ import annotations

import json
import re

import pytest

from pixellm_jax.cli import main
from tests.convert import fixtures as fx


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    fx.write_pixellm_release(root / "PixelLM")
    return root, fx.write_clip(root / "clip")


def test_convert_check_and_export(release, capsys):
    root, clip = release
    out = root / "converted"
    args = ["convert", str(root / "PixelLM"), "--clip", str(clip), "--config", "tiny", "--no-progress"]
    assert main(args + ["--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "model.layers.0.mlp.up_proj.weight [128, 64] bfloat16 -> llm/layers/mlp/up_proj/kernel[0]" in printed
    assert "vision_model.embeddings.position_embedding.weight [10, 32] float32 -> " \
           "vision_tower/embeddings/position_embedding (position_table)" in printed
    assert not out.exists()

    overridden = ["convert", str(root / "PixelLM"), "model.frozen_param_dtype=bfloat16"] + args[2:]
    assert main(overridden + ["--out", str(out), "--check"]) == 0
    printed = capsys.readouterr().out
    diffs = [float(d) for d in re.findall(r"max \|torch - jax\| = (\S+) ", printed)]
    assert len(diffs) >= 8 and max(diffs) <= 1e-5  # every stage, from exactly the source's values
    assert "check: passed" in printed
    assert "initialised: llm (4)" in printed and (out / "params").is_dir()

    assert main(args + ["--out", str(out)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err

    assert main(["export", str(out), "--to", "peft", "--out", str(root / "adapter"), "--base-model", "x"]) == 0
    assert json.loads((root / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert main(["export", str(out), "--to", "pixellm", "--out", str(root / "hf_model"), "--no-progress"]) == 0
    assert "pytorch_model.bin" in capsys.readouterr().out
    assert main(["export", str(out), "--to", "llava-hf", "--out", str(root / "hf")]) == 2
    assert "hidden_mult=2" in capsys.readouterr().err
