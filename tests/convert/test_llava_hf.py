"""llava-hf import (both vision prefixes) against transformers' logits, and the llava-hf export.

The model is configured where PixelLM and LLaVA compute the same function: feature layer -2 with
CLS dropped, a projector of width H (`projector.hidden_mult=1`), no pooling (`projector.llm_grid` =
the vision grid), one codebook token per target (N = L = 1).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from pixellm_jax.convert.converter import convert_model
from pixellm_jax.convert.importers import prepare_import
from pixellm_jax.convert.readers import CheckpointReader
from pixellm_jax.tokens import IMAGE_TOKEN
from tests.convert import fixtures as fx

LLAVA_SEMANTICS = [
    "model.projector.hidden_mult=1", "model.projector.llm_grid=3", "model.vision.image_size=42",
    "model.head.seg_token_num=1", "model.head.scale_num=1",
]
N_IMAGE = 9  # 3 x 3 patches


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava_hf")
    hub, model = fx.write_llava_hf(root / "hub", "vision_tower.vision_model.")
    flat, _ = fx.write_llava_hf(root / "flat", "vision_tower.")
    return {"hub": hub, "flat": flat, "torch": model}


@nnx.jit
def _logits(model, pixels, ids):
    hw = jnp.full((pixels.shape[0], 2), pixels.shape[1], jnp.int32)
    images = model.encode_images(pixels, hw)
    _, out = model.language(images, ids, jnp.ones(ids.shape, bool), jnp.arange(ids.shape[0]))
    return out.logits


def _inputs(seed=0, length=12):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, fx.PIECES, size=(2, length))
    ids[:, 0] = 1
    pixels = rng.normal(size=(2, 3, 42, 42)).astype(np.float32)
    expanded = np.concatenate([ids[:, :4], np.full((2, N_IMAGE), fx.PIECES), ids[:, 5:]], axis=1)
    ours = ids.copy()
    ours[:, 4] = IMAGE_TOKEN
    return pixels, expanded, ours


@pytest.mark.parametrize("layout", ["hub", "flat"])
def test_logits_match_transformers(sources, layout):
    spec = prepare_import("auto", sources[layout], base="tiny", overrides=LLAVA_SEMANTICS)
    assert spec.kind == "llava-hf"
    model, plan = convert_model(spec)
    # loaded: all of LLaMA, CLIP and the projector; initialised: PixelLM's own modules and LoRA
    assert {p.split("/")[0] for p in plan.by_target()} == {"llm", "vision_tower", "mm_projector"}
    assert "out_mm_projector/linear_1/kernel" in plan.initialised and not plan.skipped
    assert sorted(k["key"] for k in plan.report()["kept"]) == [
        f"{'vision_tower.vision_model.' if layout == 'hub' else 'vision_tower.'}post_layernorm.{w}"
        for w in ("bias", "weight")]
    assert spec.config.model.text.vocab_size == fx.LLAVA_HF_VOCAB  # codebook ids fit the padding rows

    pixels, expanded, ours = _inputs()
    with torch.no_grad():
        ref = sources["torch"](input_ids=torch.tensor(expanded), pixel_values=torch.from_numpy(pixels)).logits.numpy()
    got = np.asarray(_logits(model, jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(ours, jnp.int32)))
    assert np.abs(ref).max() > 1.0
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-5


def test_export_reproduces_the_source(sources, tmp_path):
    from pixellm_jax.convert.converter import convert_checkpoint
    from pixellm_jax.convert.exporters import export_llava_hf
    from transformers import LlavaForConditionalGeneration

    spec = prepare_import("llava-hf", sources["flat"], base="tiny", overrides=LLAVA_SEMANTICS)
    convert_checkpoint(spec, tmp_path / "ckpt")
    export = export_llava_hf(tmp_path / "ckpt", tmp_path / "hf", max_shard_size="40KB")
    assert len(export.files) > 1 and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    source, exported = CheckpointReader(sources["hub"]), CheckpointReader(tmp_path / "hf")
    assert set(exported.keys()) == set(source.keys())  # hub names, whatever the input layout was
    for key in source.keys():
        assert np.array_equal(exported.read(key), source.read(key)), key
    loaded, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert loaded.config.image_token_index == fx.PIECES
