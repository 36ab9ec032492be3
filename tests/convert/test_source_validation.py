"""Source tensors are checked as they are converted: a floating-point parameter needs a floating-point
tensor, and NaN/Inf values stop the conversion unless `--allow-nonfinite` (then each key is a warning)."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
import torch
from jax.sharding import Mesh

from pixellm_jax.cli import main
from pixellm_jax.convert import stream
from pixellm_jax.convert.checkpoint import REPORT_FILE
from pixellm_jax.convert.converter import convert_checkpoint
from pixellm_jax.convert.errors import ConversionError
from pixellm_jax.convert.importers import prepare_import
from tests.convert import fixtures as fx

NORM = "model.norm.weight"  # bf16 [64]
UP = "model.layers.0.mlp.up_proj.weight"  # bf16 [128, 64], a stacked target


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    hf_model, _, _ = fx.write_pixellm_release(root)
    return hf_model, fx.write_clip(root / "clip")


@pytest.fixture
def release(pristine, tmp_path):
    """A private copy of the release to damage."""
    hf_model, clip = pristine
    shutil.copytree(hf_model, tmp_path / "hf_model")
    return tmp_path / "hf_model", clip


def _edit(hf_model, key, edit):
    """Replace `key` in its shard by `edit(tensor)`."""
    shard = json.loads((hf_model / "pytorch_model.bin.index.json").read_text())["weight_map"][key]
    state = torch.load(hf_model / shard, weights_only=True)
    state[key] = edit(state[key])
    torch.save(state, hf_model / shard)
    return shard


def _with_nonfinite(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[:3] = float("nan")
    t.view(-1)[-1] = float("-inf")
    return t


def _convert(release, out, *flags):
    hf_model, clip = release
    return main(["convert", str(hf_model), "--clip", str(clip), "--config", "tiny", "--no-progress",
                 "--out", str(out), *flags])


@pytest.mark.parametrize("dtype, name", [(torch.int32, "int32"), (torch.bool, "bool")])
def test_a_non_float_source_for_a_float_parameter_is_refused(release, tmp_path, capsys, dtype, name):
    shard = _edit(release[0], NORM, lambda t: torch.ones(t.shape, dtype=dtype))
    assert _convert(release, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{shard}: {NORM} [64] is {name} -> llm/norm/weight expects a floating-point tensor" in err
    assert "nothing was written" in err and not (tmp_path / "out").exists()


def test_nonfinite_values_stop_the_conversion(release, tmp_path, capsys):
    hf_model, _ = release
    shard = _edit(hf_model, UP, _with_nonfinite)
    assert _convert(release, tmp_path / "out") == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"pixellm convert: {hf_model / shard}: {UP}: 4 of the 8192 values read are "
                     "NaN or infinite (pass --allow-nonfinite to convert them as they are)"]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_allow_nonfinite_converts_with_a_warning_per_key(release, tmp_path, capsys):
    hf_model, _ = release
    _edit(hf_model, UP, _with_nonfinite)
    _edit(hf_model, NORM, _with_nonfinite)
    assert _convert(release, tmp_path / "out", "--allow-nonfinite") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    assert len(warnings) == 2 and all("--allow-nonfinite" in w for w in warnings)
    assert any(f": {UP}: 4 of the 8192 values read" in w for w in warnings)
    assert any(f": {NORM}: 4 of the 64 values read" in w for w in warnings)
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert len(report["nonfinite"]) == 2


def test_sharded_conversion_checks_every_slice(release, tmp_path):
    hf_model, clip = release
    _edit(hf_model, UP, _with_nonfinite)
    spec = prepare_import("pixellm", hf_model, clip=clip, base="tiny")
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 4, 2), ("data", "fsdp", "tensor"))
    with pytest.raises(ConversionError, match=f"{UP}: [1-4] of the [0-9]+ values read are NaN or infinite"):
        convert_checkpoint(spec, tmp_path / "out", mesh=mesh)
    assert not (tmp_path / "out").exists()


def test_count_nonfinite_in_bands(monkeypatch):
    x = np.zeros((7, 5), np.float32)
    x[0, 0], x[3, 4], x[6, 2] = np.nan, np.inf, -np.inf
    monkeypatch.setattr(stream, "_CHECK_VALUES", 10)  # two rows per band
    assert stream.count_nonfinite(x) == 3
    assert stream.count_nonfinite(np.float32(np.nan)) == 1 and stream.count_nonfinite(np.zeros((0, 4))) == 0
