"""Storage dtypes follow the source: a bf16/fp32 release converted with a bf16-storage base config
(as `pixellm_7b`) keeps every tensor's bytes, exports back byte for byte, and loads for fp32 and bf16
compute; `convert.param_dtype` stores otherwise only when asked, and says so in conversion.json."""

from __future__ import annotations

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from pixellm_jax.convert.checkpoint import load_pretrained, model_params
from pixellm_jax.convert.converter import convert_checkpoint
from pixellm_jax.convert.exporters import export_llava_hf, export_pixellm
from pixellm_jax.convert.importers import prepare_import
from pixellm_jax.convert.readers import CheckpointReader
from tests.convert import fixtures as fx

BF16 = np.dtype(ml_dtypes.bfloat16)
LIKE_7B = ["model.frozen_param_dtype=bfloat16", "model.dtype=bfloat16"]  # the storage policy of pixellm_7b


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("dtypes")
    _, _, state = fx.write_pixellm_release(root / "PixelLM-7B")
    clip = fx.write_clip(root / "clip")

    def convert(name: str, *overrides: str):
        spec = prepare_import("auto", root / "PixelLM-7B", clip=clip, base="tiny", overrides=[*LIKE_7B, *overrides])
        return convert_checkpoint(spec, root / name).output

    return dict(root=root, state=state, clip=clip, exact=convert("exact"),
                rounded=convert("rounded", "convert.param_dtype=bfloat16"))


def test_each_tensor_keeps_its_source_dtype(release):
    params = model_params(load_pretrained(release["exact"]).model)
    assert params["vision_tower/embeddings/position_embedding"].dtype == jnp.float32  # CLIP fp32 in its files
    assert params["image_feature_neck/layers/0/kernel"].dtype == jnp.float32  # pixel modules fp32 in the release
    assert params["prompt_encoder/no_mask_embed/embedding"].dtype == jnp.float32
    assert params["llm/layers/self_attn/q_proj/kernel"].dtype == jnp.bfloat16  # LLM bf16 in the release
    assert params["mm_projector/linear_1/kernel"].dtype == jnp.bfloat16  # trainable, stored as the source has it
    assert params["llm/layers/self_attn/q_proj/lora_a"].dtype == jnp.float32  # initialised here: trainable fp32
    report = json.loads((release["exact"] / "conversion.json").read_text())
    assert report["param_dtype"] == "source"
    assert set(report["stored_dtypes"]) == {"float32", "bfloat16"}


def test_default_conversion_exports_back_byte_for_byte(release, tmp_path):
    export_pixellm(release["exact"], tmp_path / "hf_model")
    exported = CheckpointReader(tmp_path / "hf_model")
    for key, tensor in release["state"].items():
        ours, theirs = exported.read(key), fx.to_numpy(tensor)
        assert ours.dtype == theirs.dtype, key
        assert np.array_equal(ours.view(np.uint8), theirs.view(np.uint8)), key


def test_explicit_param_dtype_rounds_and_is_reported(release, tmp_path):
    params = model_params(load_pretrained(release["rounded"]).model)
    floating = [v.dtype for v in params.values() if jnp.issubdtype(v.dtype, jnp.floating)]
    assert set(floating) == {BF16}
    report = json.loads((release["rounded"] / "conversion.json").read_text())
    assert report["param_dtype"] == "bfloat16"
    export_pixellm(release["rounded"], tmp_path / "hf_model")
    exported = CheckpointReader(tmp_path / "hf_model")
    differ = [k for k, t in release["state"].items()
              if not np.array_equal(exported.read(k).view(np.uint8), fx.to_numpy(t).view(np.uint8))]
    assert differ and all(not k.startswith(fx.BF16_PREFIXES) for k in differ)  # only the fp32 pixel modules


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mixed_storage_runs_in_either_compute_dtype(release, dtype):
    pre = load_pretrained(release["exact"], overrides=[f"model.dtype={dtype}"])
    size = pre.config.model.vision.image_size
    rng = np.random.default_rng(0)
    pixels = jnp.asarray(rng.normal(size=(1, size, size, 3)), jnp.float32)
    seg = pre.config.model.head.seg_ids(pre.config.model.text.vocab_size)
    ids = jnp.asarray([[1, 5, -200, 7, *seg, 9]], jnp.int32)
    forward = nnx.jit(lambda model, *args: model(*args))
    out = forward(pre.model, pixels, jnp.asarray([[size, size]]), ids, jnp.ones(ids.shape, bool),
                  jnp.zeros((1,), jnp.int32))
    assert bool(jnp.isfinite(out.logits).all()) and bool(jnp.isfinite(out.mask_logits).all())
    assert int(out.seg.num_targets[0]) == 1


def test_llava_hf_fp16_source_round_trips_in_fp16(tmp_path):
    """llava-hf checkpoints are published in fp16: stored fp16, exported back unchanged."""
    from safetensors.torch import load_file, save_file

    src, _ = fx.write_llava_hf(tmp_path / "llava")
    for path in src.glob("*.safetensors"):
        save_file({k: v.half() for k, v in load_file(str(path)).items()}, str(path), metadata={"format": "pt"})
    from tests.convert.test_llava_hf import LLAVA_SEMANTICS

    spec = prepare_import("llava-hf", src, base="tiny", overrides=[*LLAVA_SEMANTICS, *LIKE_7B])
    conversion = convert_checkpoint(spec, tmp_path / "ckpt")
    ckpt = conversion.output
    params = model_params(load_pretrained(ckpt).model)
    assert params["vision_tower/embeddings/position_embedding"].dtype == jnp.float16
    # --check on a base without a pixel head: the head comes from the checkpoint, and says so
    from pixellm_jax.convert.check import check_conversion

    report = check_conversion(ckpt, conversion.plan)
    assert report.passed and report.exact == len(conversion.plan.loads), str(report)
    assert "initialised by the conversion" in str(report)
    export_llava_hf(ckpt, tmp_path / "hf")
    source, exported = CheckpointReader(src), CheckpointReader(tmp_path / "hf")
    for key in source.keys():
        ours, theirs = exported.read(key), source.read(key)
        assert ours.dtype == theirs.dtype == np.float16, key
        assert np.array_equal(ours.view(np.uint8), theirs.view(np.uint8)), key


def test_check_passes_on_the_default_and_fails_on_bf16_storage(release, capsys):
    """`pixellm convert --check` (CLI): exit 0 and every stage ok for the exact conversion; exit 1,
    rounded tensors named and the CLIP stage off, for the conversion forced to bf16."""
    from pixellm_jax.cli import main

    root = release["root"]
    def convert(*overrides: str, out: str) -> int:
        return main(["convert", str(root / "PixelLM-7B"), *LIKE_7B, *overrides, "--clip", str(release["clip"]),
                     "--config", "tiny", "--check", "--no-progress", "--out", str(root / out)])

    assert convert(out="checked") == 0
    out = capsys.readouterr().out
    assert "check: passed" in out and "FAIL" not in out
    assert "check: final mask logits" in out and "pixels change sign ok" in out
    assert convert("convert.param_dtype=bfloat16", out="checked_bf16") == 1
    captured = capsys.readouterr()
    assert "check: FAILED" in captured.out and "rounded: " in captured.out
    assert "CLIP features (level 0): " in captured.out and "--check failed" in captured.err
    print(captured.out)


def test_original_llava_and_clip_are_stored_exactly(tmp_path):
    """Original LLaVA (fp16 LLM, fp32 projector) + OpenAI CLIP (fp32): every loaded tensor is stored
    byte for byte in its own dtype (the layout has no exporter of its own; llava-hf is its export)."""
    from pixellm_jax.convert.check import CheckReport, check_stored

    src, _ = fx.write_llava(tmp_path / "llava", "mlp2x_gelu")
    clip = fx.write_clip(tmp_path / "clip")
    spec = prepare_import("llava", src, clip=clip, base="tiny", overrides=["model.projector.hidden_mult=1", *LIKE_7B])
    conversion = convert_checkpoint(spec, tmp_path / "ckpt")
    params = {k: np.asarray(v) for k, v in model_params(load_pretrained(conversion.output).model).items()}
    assert params["llm/layers/self_attn/q_proj/kernel"].dtype == np.float16
    assert params["mm_projector/linear_1/kernel"].dtype == np.float32
    report = CheckReport()
    check_stored(params, conversion.plan, report)
    assert report.exact == len(conversion.plan.loads) and not report.rounded and not report.differ
