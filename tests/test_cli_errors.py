"""Whole-file problems reach the user as one line naming the file (exit 2); `--debug` shows the traceback.

The model loader is stubbed where the error comes before any model is needed, so no checkpoint is built.
"""

import numpy as np
import pytest

from pixellm_jax.cli import main
from pixellm_jax.data.dataset_io import DatasetFileError
from pixellm_jax.errors import OutputError
from pixellm_jax.eval import commands
from pixellm_jax.eval.predict import Prediction, write_prediction


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr(commands, "load", lambda args: None)


def eval_args(tmp_path, json_file):
    return ["eval", "--checkpoint", str(tmp_path / "unused"), "--out", str(tmp_path / "out"), "--no-progress",
            "--split", f"muse:json={json_file},images={tmp_path}"]


def stderr_lines(capsys) -> list[str]:
    return capsys.readouterr().err.splitlines()


def test_malformed_json_is_one_line_naming_the_file(tmp_path, capsys, no_model):
    bad = tmp_path / "muse_val.json"
    bad.write_text('[{"file_name": "a.jpg",')
    assert main(eval_args(tmp_path, bad)) == 2
    lines = stderr_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"pixellm eval: {bad}: malformed JSON at line 1 column ")


def test_an_empty_dataset_is_one_line(tmp_path, capsys, no_model):
    empty = tmp_path / "muse_val.json"
    empty.write_text("[]")
    assert main(eval_args(tmp_path, empty)) == 2
    assert stderr_lines(capsys) == [f"pixellm eval: {empty}: no records: empty dataset"]


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(tmp_path, no_model, where):
    bad = tmp_path / "muse_val.json"
    bad.write_text("{")
    args = eval_args(tmp_path, bad)
    with pytest.raises(DatasetFileError, match="malformed JSON"):
        main(["--debug", *args] if where == "before" else [args[0], "--debug", *args[1:]])


def test_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert main(eval_args(tmp_path, tmp_path / "unused.json")) == 2
    lines = stderr_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"pixellm eval: {tmp_path / 'unused'}: not a pixellm-jax checkpoint")


def test_predict_output_under_a_file_names_the_path(tmp_path):
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "sub"
    pred = Prediction(tmp_path / "x.png", np.zeros((4, 4, 3), np.uint8), "", np.zeros((0, 4, 4), bool))
    with pytest.raises(OutputError) as e:
        write_prediction(pred, out)
    assert str(e.value) == f"cannot write {out}: Not a directory"
