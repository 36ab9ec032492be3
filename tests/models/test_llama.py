"""LlamaModel against transformers `LlamaForCausalLM` (eager attention, fp32), plus its own variants.

Checks: logits and post-norm hidden states on a right-padded batch (MHA and GQA); remat and scan
variants equal the plain loop (forward and LoRA gradients); cached decoding after a padded prefill
equals full recomputation, by ours and by transformers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from pixellm_jax.config import LoraConfig, TextConfig
from pixellm_jax.models.llama import LlamaModel
from pixellm_jax.models.lora import LoRALinear, LoRAParam

TOL = 1e-5
TINY = TextConfig(
    vocab_size=160, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=4,
    rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=256,
)


def hf_llama(cfg: TextConfig, seed: int = 0):
    """A tiny transformers LLaMA with weights redrawn larger than the default init."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.9, 1.1)
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 0.1)
    return model


def copy_hf_weights(model: LlamaModel, hf) -> None:
    """Copy a (possibly peft-wrapped) `LlamaForCausalLM` state dict into the stacked layout."""
    sd = {k.replace(".base_layer", ""): v.detach().float().numpy() for k, v in hf.state_dict().items()}
    n = model.cfg.num_layers
    has_lora = any("lora_A" in k for k in sd)

    def stacked(name: str, transpose: bool) -> np.ndarray:
        ws = [sd[f"model.layers.{i}.{name}"] for i in range(n)]
        return np.stack([w.T if transpose else w for w in ws])

    model.embed_tokens.embedding[...] = sd["model.embed_tokens.weight"]
    model.norm.weight[...] = sd["model.norm.weight"]
    model.lm_head.kernel[...] = sd["lm_head.weight"].T
    for norm in ("input_layernorm", "post_attention_layernorm"):
        getattr(model.layers, norm).weight[...] = stacked(f"{norm}.weight", False)
    for sub, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                       ("mlp", ("gate_proj", "up_proj", "down_proj"))):
        for name in names:
            proj = getattr(getattr(model.layers, sub), name)
            proj.kernel[...] = stacked(f"{sub}.{name}.weight", True)
            if has_lora and isinstance(proj, LoRALinear):
                proj.lora_a[...] = stacked(f"{sub}.{name}.lora_A.default.weight", True)
                proj.lora_b[...] = stacked(f"{sub}.{name}.lora_B.default.weight", True)


def padded_batch(cfg: TextConfig, lengths: list[int], seq: int, seed: int = 1):
    """Right-padded token ids (pad id 0) and the boolean attention mask."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, cfg.vocab_size, size=(len(lengths), seq))
    mask = np.arange(seq)[None, :] < np.array(lengths)[:, None]
    return np.where(mask, ids, 0), mask


@nnx.jit
def forward(model: LlamaModel, ids, mask=None, positions=None, cache=None):
    """A jitted model call (one compile per shape instead of eager op-by-op dispatch)."""
    return model(ids, mask, positions, cache)


def max_diff_valid(a, b, mask) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))[np.asarray(mask)]))


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_matches_transformers_on_padded_batch(kv_heads):
    cfg = dataclasses.replace(TINY, num_kv_heads=kv_heads)
    hf = hf_llama(cfg)
    model = LlamaModel(cfg, None, rngs=nnx.Rngs(0))
    copy_hf_weights(model, hf)
    ids, mask = padded_batch(cfg, [10, 7, 4], 10)

    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)), output_hidden_states=True)
    out = forward(model, jnp.asarray(ids), jnp.asarray(mask))

    assert np.abs(ref.logits.numpy()).max() > 1.0  # the weights are large enough to matter
    assert max_diff_valid(out.logits, ref.logits.numpy(), mask) <= TOL
    assert max_diff_valid(out.hidden, ref.hidden_states[-1].numpy(), mask) <= TOL
    # the input-embeddings entry point is the same function
    out_e = model(input_embeds=model.embed(jnp.asarray(ids)), attention_mask=jnp.asarray(mask))
    assert max_diff_valid(out_e.logits, out.logits, mask) <= TOL  # two programs: a few ulps apart


def _with_lora_values(model: LlamaModel, seed: int = 3) -> None:
    """Give every adapter nonzero A and B so LoRA contributes to outputs and gradients."""
    key = jax.random.key(seed)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, LoRALinear):
            key, ka, kb = jax.random.split(key, 3)
            m.lora_a[...] = 0.1 * jax.random.normal(ka, m.lora_a[...].shape)
            m.lora_b[...] = 0.1 * jax.random.normal(kb, m.lora_b[...].shape)


def test_remat_and_scan_variants_equal_plain():
    """Same outputs and LoRA gradients for every layer-execution variant (remat matters in backward)."""
    cfg = dataclasses.replace(TINY, num_kv_heads=2)
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=["q_proj", "v_proj"])
    base = LlamaModel(cfg, lora, rngs=nnx.Rngs(0))
    copy_hf_weights(base, hf_llama(cfg))
    _with_lora_values(base)
    ids, mask = padded_batch(cfg, [8, 5], 8)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)

    def loss(model):
        out = model(ids, mask)
        return jnp.sum(out.logits * mask[..., None]), out

    @nnx.jit
    def run(model):
        return nnx.value_and_grad(loss, argnums=nnx.DiffState(0, LoRAParam), has_aux=True)(model)

    (ref_val, ref_out), ref_grads = run(base)
    state = nnx.state(base)
    for remat, scan in (("full", True), ("dots", False)):
        variant = LlamaModel(dataclasses.replace(cfg, remat=remat, scan_layers=scan), lora, rngs=nnx.Rngs(1))
        nnx.update(variant, state)
        (val, out), grads = run(variant)
        assert max_diff_valid(out.logits, ref_out.logits, mask) <= 1e-6, (remat, scan)
        assert max_diff_valid(out.hidden, ref_out.hidden, mask) <= 1e-6, (remat, scan)
        assert abs(float(val - ref_val)) <= 1e-5 * abs(float(ref_val)), (remat, scan)
        assert len(jax.tree.leaves(grads)) == 4  # q and v, A and B
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            assert float(jnp.max(jnp.abs(r))) > 0
            assert float(jnp.max(jnp.abs(g - r))) <= 1e-5 * float(jnp.max(jnp.abs(r))), (remat, scan)


@pytest.mark.parametrize(("scan", "explicit_positions"), [(False, False), (True, True)],
                         ids=["loop-arange", "scan-per_row"])
def test_cached_decoding_equals_full_recomputation(scan, explicit_positions):
    cfg = dataclasses.replace(TINY, num_kv_heads=2, scan_layers=scan)
    hf = hf_llama(cfg)
    model = LlamaModel(cfg, None, rngs=nnx.Rngs(0))
    copy_hf_weights(model, hf)
    prompt_len, steps, max_len = 6, 4, 16
    prompt, prompt_mask = padded_batch(cfg, [6, 3], prompt_len)
    new = np.random.default_rng(7).integers(1, cfg.vocab_size, size=(2, steps))
    full_ids = np.concatenate([prompt, new], axis=1)
    full_mask = np.concatenate([prompt_mask, np.ones((2, steps), bool)], axis=1)
    # arange ignores padding (PixelLM); per-row positions continue each row after its last real token
    positions = np.cumsum(full_mask, axis=1) - 1 if explicit_positions else np.broadcast_to(
        np.arange(prompt_len + steps), full_ids.shape)
    full = forward(model, jnp.asarray(full_ids), jnp.asarray(full_mask), jnp.asarray(positions))

    def pos(t0, t1):
        return jnp.asarray(positions[:, t0:t1]) if explicit_positions else None

    out = forward(model, jnp.asarray(prompt), jnp.asarray(prompt_mask), pos(0, prompt_len),
                  model.init_cache(2, max_len))
    key_mask = np.zeros((2, max_len), bool)
    key_mask[:, :prompt_len] = prompt_mask
    np.testing.assert_array_equal(np.asarray(out.cache.mask), key_mask)  # the prompt's padding is kept
    logits, hidden = [out.logits], [out.hidden]
    for s in range(steps):
        t = prompt_len + s
        out = forward(model, jnp.asarray(new[:, s:s + 1]), jnp.ones((2, 1), bool), pos(t, t + 1), out.cache)
        logits.append(out.logits)
        hidden.append(out.hidden)
    assert int(out.cache.index) == prompt_len + steps
    logits, hidden = jnp.concatenate(logits, axis=1), jnp.concatenate(hidden, axis=1)
    assert max_diff_valid(logits, full.logits, full_mask) <= 1e-5
    assert max_diff_valid(hidden, full.hidden, full_mask) <= 1e-5

    with torch.no_grad():
        ref = hf(torch.tensor(full_ids), attention_mask=torch.tensor(full_mask.astype(np.int64)),
                 position_ids=torch.tensor(np.ascontiguousarray(positions)))
    assert max_diff_valid(logits, ref.logits.numpy(), full_mask) <= TOL

    # the ids under the prompt's padding are never attended to
    other = np.where(prompt_mask, prompt, 99)
    out2 = forward(model, jnp.asarray(other), jnp.asarray(prompt_mask), pos(0, prompt_len),
                   model.init_cache(2, max_len))
    step = forward(model, jnp.asarray(new[:, :1]), jnp.ones((2, 1), bool), pos(prompt_len, prompt_len + 1),
                   out2.cache)
    assert float(jnp.max(jnp.abs(step.logits - logits[:, prompt_len:prompt_len + 1]))) <= 1e-6


@pytest.mark.parametrize("prefill", [False, True], ids=["prefill-over-cache", "prefill-within-prompt"])
def test_unstacked_cache_decodes_as_the_stacked_one(prefill):
    """Per-layer cache buffers and pre-sliced layers (the generation loop's layout) give the stacked
    cache's logits and cache; `prefill=True` (the prompt attends within itself) changes nothing."""
    cfg = dataclasses.replace(TINY, num_kv_heads=2, scan_layers=True)
    model = LlamaModel(cfg, None, rngs=nnx.Rngs(0))
    copy_hf_weights(model, hf_llama(cfg))
    steps, max_len = 4, 16
    prompt, prompt_mask = (jnp.asarray(a) for a in padded_batch(cfg, [6, 3], 6))
    new = jnp.asarray(np.random.default_rng(7).integers(1, cfg.vocab_size, size=(2, steps)))
    ones = jnp.ones((2, 1), bool)

    @nnx.jit
    def stacked(model):
        out = model(prompt, prompt_mask, cache=model.init_cache(2, max_len))
        logits = [out.logits]
        for s in range(steps):
            out = model(new[:, s:s + 1], ones, cache=out.cache)
            logits.append(out.logits)
        return jnp.concatenate(logits, axis=1), out.cache

    @nnx.jit
    def unstacked(model):
        layers = model.unstacked_layers()
        out = model(prompt, prompt_mask, cache=model.init_cache(2, max_len, unstacked=True), layers=layers,
                    prefill=prefill)
        logits = [out.logits]
        for s in range(steps):
            out = model(new[:, s:s + 1], ones, cache=out.cache, layers=layers)
            logits.append(out.logits)
        return jnp.concatenate(logits, axis=1), out.cache

    ref_logits, ref_cache = stacked(model)
    logits, cache = unstacked(model)
    valid = np.concatenate([np.asarray(prompt_mask), np.ones((2, steps), bool)], axis=1)
    assert max_diff_valid(logits, ref_logits, valid) <= 1e-5
    assert cache.unstacked and len(cache.k) == cfg.num_layers and int(cache.index) == int(ref_cache.index)
    np.testing.assert_array_equal(np.asarray(cache.mask), np.asarray(ref_cache.mask))
    split = LlamaModel.unstack_cache(ref_cache)
    for mine, ref in zip(cache.k + cache.v, split.k + split.v):
        assert mine.shape == (2, cfg.num_kv_heads, max_len, cfg.head_dim)
        np.testing.assert_allclose(np.asarray(mine), np.asarray(ref), atol=1e-5)


def test_rejects_bad_inputs():
    model = LlamaModel(TINY, None, rngs=nnx.Rngs(0))
    ids = jnp.ones((2, 3), jnp.int32)
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, input_embeds=model.embed(ids))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, jnp.ones((2, 4), bool))
