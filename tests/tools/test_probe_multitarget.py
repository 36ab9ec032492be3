"""tools/probe_multitarget.py: its linear probe separates what is separable and not what is not, its
patch labels follow the scene, and a run on a tiny checkpoint reports every probe in range."""

import json

import numpy as np
import pytest

from pixellm_jax.data.synthetic import COLOURS, SHAPES, SyntheticShapes
from tests.tools._load import load_tool

probe = load_tool("probe_multitarget")


def test_ridge_probe_reads_a_linear_code_and_not_noise():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 400)
    code = np.eye(4)[y] @ rng.normal(size=(4, 16)) + 0.1 * rng.normal(size=(400, 16))
    assert probe.ridge_accuracy(code, y, 200) > 0.95
    noise = rng.normal(size=(400, 16))
    assert probe.ridge_accuracy(noise, y, 200) < 0.45  # chance is 0.25


def test_patch_labels_follow_the_shapes():
    src = SyntheticShapes(num_samples=1, seed=5, min_size=64, max_size=64, min_shapes=3)
    scene = src.scene(0)
    colour, kind = probe.patch_labels(scene, 64)  # one patch per pixel: the labels are the scene's own
    for s, vis in zip(scene.shapes, scene.visible):
        assert (colour.reshape(64, 64)[vis] == 1 + list(COLOURS).index(s.colour)).all()
        assert (kind.reshape(64, 64)[vis] == 1 + SHAPES.index(s.kind)).all()
    assert (colour.reshape(64, 64)[~scene.visible.any(0)] == 0).all()


@pytest.mark.slow
def test_probe_runs_on_a_checkpoint(tmp_path, capsys):
    from tests.eval.tiny import sure_seg_checkpoint

    sure_seg_checkpoint(tmp_path)
    out = tmp_path / "probe.json"
    assert probe.main(["--checkpoint", str(tmp_path / "ckpt"), "--scenes", "4", "--size", "56", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["scenes"] == 4 and result["targets"] >= 8  # every question names two or more targets
    for key in ("prompt_cosine_same_answer", "prompt_cosine_other_image"):
        assert -1.0 <= result[key] <= 1.0
    for key in ("mask_iou_own_target", "mask_iou_mark_everything", "mask_iou_between_targets",
                "best_match_is_own_target"):
        assert 0.0 <= result[key] <= 1.0
    assert result["mask_iou_mark_everything"] > 0  # the union of the shapes covers each target
    for name in ("clip_deep", "clip_shallow", "neck_deep"):
        assert set(result["linear_probe"][name]) == {"colour", "kind"}
    assert "linear probe clip_deep" in capsys.readouterr().out
