"""An evaluation that scores nothing fails: no metric over nothing, exit 1 naming the split and why.

Every sample here is skipped before a batch is built, so nothing is compiled: the tiny checkpoint is
only loaded, and the one split that is scored runs on a stand-in runner.
"""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

from pixellm_jax.cli import main
from pixellm_jax.data.muse import MuseSource
from pixellm_jax.data.synthetic import SyntheticShapes
from pixellm_jax.eval.batches import BatchShape
from pixellm_jax.eval.evaluate import EvalSettings, NothingScored, Split, run_eval
from pixellm_jax.eval.loading import legacy_tokenizer
from pixellm_jax.eval.metrics import MuseMeter, ReferringMeter
from tests.eval.tiny import random_model, save_checkpoint, tiny_config, tiny_tokenizer


def write_muse_json(path, files=("a.jpg", "b.jpg")):
    """A MUSE annotation file of one record per image file (the images themselves are not written)."""
    inst = {"category_name": "cup", "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]]}
    records = [{"file_name": f, "height": 12, "width": 16, "ann_list": [inst], "questions": ["Where is the cup?"],
                "answers": [[inst]]} for f in files]
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("empty_eval")
    hf, seg = tiny_tokenizer(tmp / "tok")
    cfg = tiny_config(hf, seg)
    save_checkpoint(random_model(cfg), cfg, hf, tmp / "ckpt")
    muse = f"muse:json={write_muse_json(tmp / 'muse.json')},images={tmp / 'wrong_folder'}"
    return SimpleNamespace(tmp=tmp, cfg=cfg, legacy=legacy_tokenizer(hf, cfg), muse=muse,
                           args=["eval", "--checkpoint", str(tmp / "ckpt"), "--no-progress"])


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("pixellm ")]


def test_metrics_over_nothing_are_none():
    referring = ReferringMeter.result(ReferringMeter().sums())
    assert referring == {"giou": None, "ciou": None, "targets": 0}
    muse = MuseMeter.result(MuseMeter().sums())
    assert muse["corrected"] == {"giou": None, "ciou": None, "pairs": 0}
    assert muse["official"] == {"giou": None, "ciou": None, "normaliser": 0}


def test_eval_with_a_wrong_image_folder_exits_1_naming_the_split(env, capsys):
    out = env.tmp / "wrong_images"
    assert main(env.args + ["--out", str(out), "--split", env.muse]) == 1
    lines = error_lines(capsys)
    assert len(lines) == 1
    assert lines[0].startswith("pixellm eval: split muse: no sample could be scored: 2 of 2 samples were skipped "
                               "(first: muse:a.jpg image file not found: ")
    assert str(env.tmp / "wrong_folder") in lines[0]
    metrics = json.loads((out / "metrics.json").read_text())["muse"]
    assert (metrics["rows"], metrics["skipped_samples"], metrics["skipped_by_reason"]) == (0, 2, {"bad_image": 2})
    assert metrics["corrected"]["giou"] is None and metrics["official"]["ciou"] is None  # JSON null


class NoTargets:
    """A runner stand-in whose teacher-forced step predicts no target on any row (nothing is compiled)."""

    def __init__(self, cfg):
        self.cfg = cfg.model

    def teacher_forced(self, batch):
        rows, (h, w) = len(batch.arrays["input_ids"]), batch.out_hw
        return {"num_targets": np.zeros(rows, np.int32), "malformed": np.zeros(rows, bool),
                "mask_logits": np.zeros((rows, 1, h, w), np.float32)}


def test_the_other_splits_metrics_are_written_before_the_failure(env):
    splits = [Split("syn", SyntheticShapes(num_samples=2, seed=0), "teacher_forced"),
              Split("muse", MuseSource(env.tmp / "muse.json", env.tmp / "wrong_folder"), "generate")]
    settings = EvalSettings(shape=BatchShape(image_size=env.cfg.model.vision.image_size))
    out = env.tmp / "partial"
    with pytest.raises(NothingScored, match=r"^split muse: no sample could be scored: 2 of 2 samples"):
        run_eval(NoTargets(env.cfg), env.legacy, lambda ids: "", splits, out, settings, progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["syn"]["rows"] > 0 and metrics["syn"]["giou"] == 0.0 and metrics["syn"]["skipped_samples"] == 0
    assert metrics["syn"]["skipped_by_reason"] == {}
    assert metrics["muse"]["rows"] == 0
    assert len((out / "syn.samples.jsonl").read_text().splitlines()) == metrics["syn"]["rows"]


def test_an_out_path_under_a_file_is_one_line(env, capsys):
    blocker = env.tmp / "a_file"
    blocker.write_text("")
    assert main(env.args + ["--out", str(blocker / "sub"), "--split", env.muse]) == 2
    assert error_lines(capsys) == [f"pixellm eval: cannot write {blocker / 'sub'}: Not a directory"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_out_directory_is_one_line(env, capsys):
    locked = env.tmp / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(env.args + ["--out", str(locked / "sub"), "--split", env.muse]) == 2
    finally:
        locked.chmod(0o700)
    assert error_lines(capsys) == [f"pixellm eval: cannot write {locked / 'sub'}: Permission denied"]
