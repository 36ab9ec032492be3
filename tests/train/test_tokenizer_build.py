"""A from-scratch run's tokenizer, built from its configured training data (`pixellm build-tokenizer`)."""

import json

import numpy as np
import pytest
import sentencepiece as spm
from PIL import Image

from pixellm_jax.cli import main
from pixellm_jax.config import ConfigError, load_config
from pixellm_jax.train.data import build_tokenizer, built_tokenizer_pieces
from tests.data.test_muse import H, W, inst, poly

WORDS = "zorblax quindle"


def write_made_up_muse(root, images=True):
    """A MUSE release at `root` whose questions and answers use made-up words; returns its spec."""
    if images:
        (root / "images/train2014").mkdir(parents=True)
        Image.fromarray(np.full((H, W, 3), 128, np.uint8)).save(root / "images/train2014/a.jpg")
    recs = []
    for i in range(4):
        target = inst("zorblax", poly(1, 1, 6, 5), "the quindle zorblax")
        recs.append({"file_name": "a.jpg", "height": H, "width": W, "ann_list": [target],
                     "questions": [f"Which zorblax quindles the frumious snark number {i}?"], "answers": [[target]],
                     "text_answers": ["The zorblax {seg} quindles."]})  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    (root / "zorb.json").write_text(json.dumps(recs))
    return f"muse:json={root / 'zorb.json'},images={root / 'images'}"


def pieces_of(directory, text=WORDS):
    return spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model")).encode(text, out_type=str)


SYNTHETIC = ["data.datasets=[synthetic]", "data.sample_rates=[1.0]", "data.val=[]"]  # the built-in set in memory


def test_built_from_the_configured_datasets(tmp_path):
    spec = write_made_up_muse(tmp_path / "muse")
    muse = build_tokenizer(load_config("demo", [f'data.datasets=["{spec}"]', "data.sample_rates=[1.0]"]), tmp_path / "muse_tok")
    synthetic = build_tokenizer(load_config("demo", SYNTHETIC), tmp_path / "synthetic_tok")
    assert len(pieces_of(muse)) < len(pieces_of(synthetic))
    assert spm.SentencePieceProcessor(model_file=str(muse / "tokenizer.model")).vocab_size() == 640


def test_unusable_records_and_vocabulary_sizes(tmp_path):
    spec = write_made_up_muse(tmp_path / "muse", images=False)
    with pytest.raises(ConfigError, match="none of the 4 records"):
        build_tokenizer(load_config("demo", [f'data.datasets=["{spec}"]', "data.sample_rates=[1.0]"]), tmp_path / "tok")
    with pytest.raises(ConfigError, match="model.text.vocab_size"):
        built_tokenizer_pieces(load_config("demo", [*SYNTHETIC, "model.text.vocab_size=100"]))
    assert built_tokenizer_pieces(load_config("demo", SYNTHETIC)) == 640
    with pytest.raises(ConfigError, match="train.tokenizer"):  # a real-size vocabulary needs a real tokenizer
        built_tokenizer_pieces(load_config("pixellm_7b"))


def test_cli(tmp_path, capsys):
    from transformers import AutoTokenizer

    spec = write_made_up_muse(tmp_path / "muse")
    out = tmp_path / "tok"
    args = ["build-tokenizer", "--config", "demo", "--out", str(out), f'data.datasets=["{spec}"]',
            "data.sample_rates=[1.0]"]
    assert main(args) == 0
    assert f"wrote {out}: 640 pieces from {spec}" in capsys.readouterr().out
    assert {"tokenizer.model", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == 640 and tok(WORDS).input_ids[0] == tok.bos_token_id == 1
    assert tok.decode(tok(WORDS).input_ids, skip_special_tokens=True) == WORDS

    (out / "marker").write_text("kept")
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err and (out / "marker").is_file()
    assert main([*args, "--force"]) == 0
    assert not (out / "marker").exists() and (out / "tokenizer.model").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["muse", "tok"]  # no partial directory left


def test_cli_relative_paths_and_dataset_option(tmp_path, monkeypatch, capsys):
    write_made_up_muse(tmp_path / "muse")
    monkeypatch.chdir(tmp_path)
    spec = "muse:json=muse/zorb.json,images=muse/images"
    args = ["build-tokenizer", "--config", "demo", "--out", "tok", "--dataset", spec]
    assert main(args) == 0
    assert f"muse:json={tmp_path / 'muse/zorb.json'}" in capsys.readouterr().out
    assert pieces_of(tmp_path / "tok", "zorblax") == ["▁zorblax"]  # the MUSE texts, not the demo's synthetic ones


def test_cli_refuses_a_real_size_config(tmp_path, capsys):
    out = tmp_path / "tok"
    assert main(["build-tokenizer", "--config", "pixellm_7b", "--out", str(out)]) == 2
    assert "train.tokenizer" in capsys.readouterr().err and not out.exists()
