"""Streaming reads (safetensors, zip and legacy `.bin`, shard indexes) and the key tables' transforms."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pixellm_jax.convert.errors import ConversionError
from pixellm_jax.convert.exporters import parse_size
from pixellm_jax.convert.readers import CheckpointReader
from pixellm_jax.convert.tables import PERMUTATIONS, PositionTable, llama_rules, pixellm_release_table
from pixellm_jax.models.clip_positions import resize_position_table


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(6, 10, generator=g).bfloat16(), "b.bias": torch.randn(7, generator=g),
            "c.half": torch.randn(3, 4, 2, generator=g).half()}


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "legacy"])
def test_reads_stored_dtypes_and_slices(tmp_path, fmt):
    tensors = _tensors()
    path = tmp_path / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    if fmt == "safetensors":
        save_file(tensors, str(path))
    else:
        torch.save(tensors, path, _use_new_zipfile_serialization=fmt == "bin")
    if fmt == "legacy":
        with pytest.warns(UserWarning, match="legacy"):
            reader = CheckpointReader(tmp_path)
    else:
        reader = CheckpointReader(tmp_path)
    assert list(reader.keys()) == list(tensors)
    a = reader.read("a.weight")
    assert a.dtype == ml_dtypes.bfloat16 and reader.infos["a.weight"].shape == (6, 10)
    np.testing.assert_array_equal(a.astype(np.float32), tensors["a.weight"].float().numpy())  # no rounding on the way
    assert reader.read("c.half").dtype == np.float16
    part = reader.read("a.weight", (slice(2, 4), slice(3, 9)))
    np.testing.assert_array_equal(part.astype(np.float32), tensors["a.weight"][2:4, 3:9].float().numpy())


def test_index_and_shards_must_agree(tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"y": torch.zeros(2)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {"x": "model-00001-of-00002.safetensors",
                                             "y": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=r"model-00001-of-00002.safetensors: the index places y in this file"):
        CheckpointReader(tmp_path)
    index["weight_map"]["y"] = "model-00003-of-00003.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=r"model-00003-of-00003.safetensors: shard listed in the index is "
                                              r"missing; it should hold y"):
        CheckpointReader(tmp_path)


def test_truncated_safetensors(tmp_path):
    save_file(_tensors(), str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 40])
    with pytest.raises(ConversionError, match=r"model.safetensors: cannot read checkpoint file \(truncated"):
        CheckpointReader(tmp_path)


@pytest.mark.parametrize("name", sorted(PERMUTATIONS))
def test_permutations_invert_and_map_slices(name):
    t = PERMUTATIONS[name]
    x = np.random.default_rng(0).normal(size=(4, 6, 2, 2) if name != "transpose" else (4, 6))
    y = t.forward(x)
    np.testing.assert_array_equal(t.inverse(y), x)
    assert t.target_shape(x.shape) == y.shape
    index = tuple(slice(1, n) if n > 1 else slice(None) for n in y.shape)
    np.testing.assert_array_equal(t.forward(x[t.source_index(index, x.shape)]), y[index])


def test_position_table_transform():
    table = np.random.default_rng(0).normal(size=(10, 8)).astype(np.float32)  # 3 x 3 grid + CLS
    t = PositionTable(grid=4, method="official")
    assert t.target_shape(table.shape) == (17, 8) and t.source_index((slice(None),) * 2, table.shape) is None
    np.testing.assert_array_equal(t.forward(table), resize_position_table(table, 4, "official"))
    np.testing.assert_array_equal(PositionTable(grid=3, method="official").forward(table), table)  # same grid


def test_rules_go_both_ways():
    table = pixellm_release_table()
    rule, path, layer = table.rule_for_key("model.layers.7.mlp.down_proj.weight")
    assert (path, layer, rule.transform) == ("llm/layers/mlp/down_proj/kernel", 7, "transpose")
    _, path, _ = table.rule_for_key("model.mask_decoder.output_upscaling.0.weight")
    assert path == "mask_decoder/output_upscaling/layers/0/kernel"
    rule, values = table.rule_for_target("mask_decoder/output_hypernetworks_mlps/3/layers/2/kernel")
    assert rule.source_key(values) == "model.mask_decoder.output_hypernetworks_mlps.3.layers.2.weight"
    assert table.rule_for_key("model.layers.x.mlp.down_proj.weight") is None
    rules = llama_rules("language_model.model.", "language_model.")
    assert rules[-1].source == "language_model.lm_head.weight"


def test_parse_size():
    assert parse_size("10GB") == 10**10 and parse_size("200KB") == 200_000 and parse_size(5) == 5
    with pytest.raises(ConversionError):
        parse_size("lots")
