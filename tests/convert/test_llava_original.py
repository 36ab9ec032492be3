"""Original LLaVA (v1 linear, v1.5 mlp2x_gelu) + CLIP as a PixelLM base: what loads, what is initialised."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from pixellm_jax.convert.checkpoint import load_pretrained, model_params
from pixellm_jax.convert.converter import convert_checkpoint, plan_conversion
from pixellm_jax.convert.importers import prepare_import
from tests.convert import fixtures as fx

PIXELLM_ADDS = {"out_mm_projector", "text_hidden_fcs", "image_feature_neck", "prompt_encoder", "mask_decoder"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    v1, _ = fx.write_llava(root / "v1", "linear")
    v15, state = fx.write_llava(root / "v15", "mlp2x_gelu")
    return {"linear": v1, "mlp2x_gelu": v15, "state": state, "clip": fx.write_clip(root / "clip")}


def _initialised_roots(plan):
    return {p.split("/")[0] for p in plan.initialised if not p.endswith(("lora_a", "lora_b"))}


def test_v1_linear_projector_is_skipped(sources):
    spec = prepare_import("auto", sources["linear"], clip=sources["clip"], base="tiny")
    assert spec.kind == "llava"
    plan = plan_conversion(spec)
    assert {p.split("/")[0] for p in plan.by_target()} == {"llm", "vision_tower"}
    assert _initialised_roots(plan) == PIXELLM_ADDS | {"mm_projector"}
    ignored = {info.key: why for info, why in plan.ignored}
    assert "single-Linear projector" in ignored["model.mm_projector.weight"]
    assert "model.layers.1.self_attn.rotary_emb.inv_freq" in ignored
    assert any("v1 linear projector" in n for n in spec.notes)


def test_v15_projector_loads_only_with_its_shape(sources):
    pixellm = plan_conversion(prepare_import("llava", sources["mlp2x_gelu"], clip=sources["clip"], base="tiny"))
    assert _initialised_roots(pixellm) == PIXELLM_ADDS | {"mm_projector"}  # PixelLM's is 2H wide
    assert {info.key for info, _ in pixellm.skipped} == {f"model.mm_projector.{i}.{w}" for i in (0, 2)
                                                         for w in ("weight", "bias")}
    assert "another shape" in pixellm.initialised["mm_projector/linear_1/kernel"]
    same = plan_conversion(prepare_import("llava", sources["mlp2x_gelu"], clip=sources["clip"], base="tiny",
                                          overrides=["model.projector.hidden_mult=1"]))
    assert {p.split("/")[0] for p in same.by_target()} == {"llm", "vision_tower", "mm_projector"}
    assert not same.skipped and _initialised_roots(same) == PIXELLM_ADDS


def test_vocabulary_grows_by_the_codebook(sources, tmp_path):
    spec = prepare_import("llava", sources["mlp2x_gelu"], clip=sources["clip"], base="tiny")
    # [SEG0..5] then <im_start>, <im_end>, appended to the 420-token vocabulary as the official script adds them
    assert spec.config.model.head.seg_token_ids == list(range(420, 426))
    assert spec.config.model.text.vocab_size == 428
    conversion = convert_checkpoint(spec, tmp_path / "base")
    assert set(conversion.plan.partial) == {"llm/embed_tokens/embedding", "llm/lm_head/kernel"}
    params = model_params(load_pretrained(tmp_path / "base").model)
    emb = np.asarray(params["llm/embed_tokens/embedding"])
    np.testing.assert_array_equal(emb[:420], sources["state"]["model.embed_tokens.weight"].float().numpy())
    new = emb[420:]
    assert np.all(np.isfinite(new)) and 0.005 < new.std() < 0.05  # N(0, 0.02) rows
    head = np.asarray(params["llm/lm_head/kernel"])
    np.testing.assert_array_equal(head[:, :420], sources["state"]["lm_head.weight"].float().numpy().T)
    tok = AutoTokenizer.from_pretrained(tmp_path / "base" / "tokenizer")
    assert tok.convert_tokens_to_ids(["[SEG0]", "[SEG5]", "<im_start>", "<im_end>"]) == [420, 425, 426, 427]
    assert (tmp_path / "base" / "tokenizer" / "tokenizer.model").is_file()
