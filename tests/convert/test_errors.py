"""Bad sources: each error names the file and the key, and nothing is written."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from pixellm_jax.convert.converter import convert_checkpoint
from pixellm_jax.convert.errors import ConversionError
from pixellm_jax.convert.importers import prepare_import
from tests.convert import fixtures as fx

SHARD1, SHARD2 = "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    hf_model, _, _ = fx.write_pixellm_release(root)
    return hf_model, fx.write_clip(root / "clip")


@pytest.fixture
def release(pristine, tmp_path):
    """A private copy of the release to damage."""
    hf_model, clip = pristine
    copy = tmp_path / "hf_model"
    shutil.copytree(hf_model, copy)
    return copy, clip


def _edit_shard(directory, name, edit):
    state = torch.load(directory / name, weights_only=True)
    edit(state)
    torch.save(state, directory / name)
    index_path = directory / "pytorch_model.bin.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != name} | {k: name for k in state}
    index_path.write_text(json.dumps(index))


def _convert(release, out):
    hf_model, clip = release
    spec = prepare_import("pixellm", hf_model, clip=clip, base="tiny")
    convert_checkpoint(spec, out)


def _shard_of(release, key):
    index = json.loads((release[0] / "pytorch_model.bin.index.json").read_text())
    return index["weight_map"][key]


def _first_key(release, shard):
    index = json.loads((release[0] / "pytorch_model.bin.index.json").read_text())
    return min(k for k, v in index["weight_map"].items() if v == shard)


class _RunsCode:
    """Unpickling this would call os.system (a pickle that executes code)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_code_executing_pickle_is_refused(release, tmp_path):
    marker = tmp_path / "pwned"
    shard = _shard_of(release, "model.norm.weight")
    torch.save({"model.norm.weight": _RunsCode(f"touch {marker}")}, release[0] / shard)
    with pytest.raises(ConversionError) as err:
        _convert(release, tmp_path / "out")
    message = str(err.value)
    assert shard in message and "refused to unpickle" in message and _first_key(release, shard) in message
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_truncated_shard_names_file_and_keys(release, tmp_path):
    path = release[0] / SHARD2
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError) as err:
        _convert(release, tmp_path / "out")
    message = str(err.value)
    assert SHARD2 in message and "truncated" in message and _first_key(release, SHARD2) in message
    assert not (tmp_path / "out").exists()


def test_problems_are_reported_together_before_writing(release, tmp_path):
    """A wrong shape, an unknown key and a missing key: one error naming each file and key."""
    shape_shard = _shard_of(release, "lm_head.weight")

    def widen(state):
        state["lm_head.weight"] = torch.zeros(fx.RELEASE_VOCAB, 65, dtype=torch.bfloat16)

    _edit_shard(release[0], shape_shard, widen)
    norm_shard = _shard_of(release, "model.norm.weight")

    def add_and_remove(state):
        state["model.extra_head.weight"] = torch.zeros(3, 3)
        del state["model.norm.weight"]

    _edit_shard(release[0], norm_shard, add_and_remove)
    with pytest.raises(ConversionError) as err:
        _convert(release, tmp_path / "out")
    message = str(err.value)
    assert "3 problem(s); nothing was written" in message
    assert f"{shape_shard}: lm_head.weight [429, 65] -> llm/lm_head/kernel expects [64, 429]" in message
    assert f"{norm_shard}: model.extra_head.weight [3, 3]: no rule of the PixelLM release table" in message
    assert "llm/norm/weight [64] (expected e.g. model.norm.weight)" in message
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_missing_clip_and_layer_out_of_range(release):
    hf_model, clip = release
    with pytest.raises(ConversionError, match="pass --clip"):
        prepare_import("pixellm", hf_model, base="tiny")
    spec = prepare_import("pixellm", hf_model, clip=clip, base="tiny", overrides=["model.text.num_layers=1"])
    from pixellm_jax.convert.converter import plan_conversion

    with pytest.raises(ConversionError, match=r"model\.layers\.1\.self_attn\.q_proj\.weight \[64, 64\]: layer 1, "
                                              r"but llm/layers/self_attn/q_proj/kernel has 1 layers"):
        plan_conversion(spec)
