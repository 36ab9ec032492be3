"""LoRA against peft on the tiny transformers LLaMA: outputs, merge/unmerge, init, dropout."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from pixellm_jax.config import LoraConfig
from pixellm_jax.models.llama import LlamaModel
from pixellm_jax.models.lora import LoRALinear, LoRAParam, merge_lora, unmerge_lora
from tests.models.test_llama import TINY, copy_hf_weights, forward, hf_llama, max_diff_valid, padded_batch

TOL = 1e-5
CFG = dataclasses.replace(TINY, num_kv_heads=2)
LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=["q_proj", "v_proj"])


def peft_llama(seed: int = 0):
    """peft LoRA (r=4, alpha=8, q_proj/v_proj) on the tiny LLaMA, with A and B redrawn nonzero."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    hf = hf_llama(CFG, seed)
    peft_cfg = PeftLoraConfig(r=LORA.rank, lora_alpha=LORA.alpha, lora_dropout=0.0,
                              target_modules=["q_proj", "v_proj"], bias="none")
    model = get_peft_model(hf, peft_cfg).eval()
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.1)
    return model


def test_lora_params_are_selectable():
    model = LlamaModel(CFG, LORA, rngs=nnx.Rngs(0))
    flat = {".".join(map(str, k)): v for k, v in nnx.to_flat_state(nnx.state(model, LoRAParam))}
    assert sorted(flat) == [f"layers.self_attn.{p}.lora_{f}" for p in ("q_proj", "v_proj") for f in "ab"]
    assert issubclass(LoRAParam, nnx.Param)
    assert flat["layers.self_attn.q_proj.lora_a"].get_metadata()["out_sharding"] == ("layers", "embed", "lora_rank")
    assert flat["layers.self_attn.v_proj.lora_b"].get_metadata()["out_sharding"] == ("layers", "lora_rank", "kv_heads")
    assert not isinstance(model.layers.self_attn.k_proj, LoRALinear)


def test_matches_peft_and_merges():
    pm = peft_llama()
    model = LlamaModel(CFG, LORA, rngs=nnx.Rngs(0))
    copy_hf_weights(model, pm.base_model.model)
    ids, mask = padded_batch(CFG, [9, 6, 3], 9)
    t_ids, t_mask = torch.tensor(ids), torch.tensor(mask.astype(np.int64))

    with torch.no_grad():
        ref = pm(input_ids=t_ids, attention_mask=t_mask, output_hidden_states=True)
        with pm.disable_adapter():
            base = pm(input_ids=t_ids, attention_mask=t_mask).logits.numpy()
    assert max_diff_valid(ref.logits.numpy(), base, mask) > 0.1  # the adapters matter
    out = forward(model, jnp.asarray(ids), jnp.asarray(mask))
    assert max_diff_valid(out.logits, ref.logits.numpy(), mask) <= TOL
    assert max_diff_valid(out.hidden, ref.hidden_states[-1].numpy(), mask) <= TOL

    q = model.layers.self_attn.q_proj
    base_kernel = np.asarray(q.kernel[...])
    merge_lora(model)
    assert q.merged and model.layers.self_attn.v_proj.merged
    merged = forward(model, jnp.asarray(ids), jnp.asarray(mask))
    assert max_diff_valid(merged.logits, out.logits, mask) <= TOL  # the adapter is not counted twice
    with pytest.raises(ValueError, match="already merged"):
        q.merge()

    merged_hf = pm.merge_and_unload().state_dict()
    for name in ("q_proj", "v_proj"):
        kernel = np.asarray(getattr(model.layers.self_attn, name).kernel[...])
        for i in range(CFG.num_layers):
            w = merged_hf[f"model.layers.{i}.self_attn.{name}.weight"].numpy().T
            assert np.max(np.abs(kernel[i] - w)) <= 1e-6

    unmerge_lora(model)
    assert not q.merged
    assert np.max(np.abs(np.asarray(q.kernel[...]) - base_kernel)) <= 1e-6
    again = forward(model, jnp.asarray(ids), jnp.asarray(mask))
    assert max_diff_valid(again.logits, out.logits, mask) <= TOL


def test_init_matches_peft_distribution():
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) as torch kaiming_uniform_(a=sqrt(5)); B = 0."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    rank, fan_in = 64, CFG.hidden_size
    bound = 1.0 / np.sqrt(fan_in)
    pm = get_peft_model(hf_llama(CFG), PeftLoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj"]))
    peft_a = np.concatenate([p.detach().numpy().ravel() for n, p in pm.named_parameters() if "lora_A" in n])
    peft_b = [p.detach().numpy() for n, p in pm.named_parameters() if "lora_B" in n]

    layer = LoRALinear(fan_in, 96, LoraConfig(rank=rank, alpha=rank), ("embed", "heads"), rngs=nnx.Rngs(0))
    ours_a = np.asarray(layer.lora_a[...]).ravel()
    assert layer.lora_a[...].shape == (fan_in, rank) and layer.lora_b[...].shape == (rank, 96)
    assert not np.any(np.asarray(layer.lora_b[...])) and not any(np.any(b) for b in peft_b)
    for a in (peft_a, ours_a):
        assert np.max(np.abs(a)) <= bound
        assert np.max(np.abs(a)) > 0.99 * bound
        assert abs(np.std(a) - bound / np.sqrt(3)) < 0.03 * bound
        assert abs(np.mean(a)) < 0.03 * bound
    # two-sample agreement of the distributions (deciles)
    qs = np.linspace(0.1, 0.9, 9)
    assert np.max(np.abs(np.quantile(ours_a, qs) - np.quantile(peft_a, qs))) < 0.05 * bound


def test_bias_and_formula():
    """y = x W + b + (alpha / r) x A B, and merging folds exactly that update into W."""
    layer = LoRALinear(6, 5, LoraConfig(rank=2, alpha=6.0), ("embed", "mlp"), use_bias=True, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    w, b, a, bb = (rng.normal(size=s).astype(np.float32) for s in ((6, 5), (5,), (6, 2), (2, 5)))
    layer.kernel[...], layer.bias[...], layer.lora_a[...], layer.lora_b[...] = w, b, a, bb
    assert layer.bias.get_metadata()["out_sharding"] == ("mlp",)
    x = rng.normal(size=(3, 6)).astype(np.float32)
    expected = x @ w + b + 3.0 * (x @ a @ bb)
    np.testing.assert_allclose(layer(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)
    layer.merge()
    np.testing.assert_allclose(layer.kernel[...], w + 3.0 * a @ bb, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(layer(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)


def test_dropout_only_when_not_deterministic():
    """With W = 0, A = B = I and s = 1, the layer returns dropout(x): x, or entries in {0, x/(1-p)}."""
    n, rate = 16, 0.5
    layer = LoRALinear(n, n, LoraConfig(rank=n, alpha=float(n), dropout=rate), ("embed", "heads"),
                       rngs=nnx.Rngs(params=0, dropout=1))
    layer.kernel[...] = jnp.zeros((n, n))
    layer.lora_a[...] = jnp.eye(n)
    layer.lora_b[...] = jnp.eye(n)
    x = jax.random.normal(jax.random.key(2), (8, n)) + 3.0  # no zeros in x

    np.testing.assert_allclose(layer(x), x, rtol=1e-6)
    np.testing.assert_allclose(layer(x, deterministic=True), x, rtol=1e-6)
    y1, y2 = layer(x, deterministic=False), layer(x, deterministic=False)
    for y in (y1, y2):
        dropped = np.isclose(np.asarray(y), 0.0, atol=1e-6)
        kept = np.isclose(np.asarray(y), np.asarray(x) / (1 - rate), rtol=1e-5)
        assert np.all(dropped | kept)
        assert 0.3 < dropped.mean() < 0.7
    assert not np.array_equal(np.asarray(y1), np.asarray(y2))  # the stream advances


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_model_dropout_streams_advance(scan):
    cfg = dataclasses.replace(CFG, scan_layers=scan)
    model = LlamaModel(cfg, dataclasses.replace(LORA, dropout=0.5), rngs=nnx.Rngs(params=0, dropout=1))
    for _, m in nnx.iter_modules(model):
        if isinstance(m, LoRALinear):
            m.lora_b[...] = jnp.full(m.lora_b[...].shape, 0.1)
    ids = jnp.asarray(padded_batch(cfg, [6, 6], 6)[0])

    @nnx.jit(static_argnames="deterministic")
    def logits(model, deterministic):
        return model(ids, deterministic=deterministic).logits

    a, b = logits(model, False), logits(model, False)
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3
    np.testing.assert_array_equal(np.asarray(model.layers.self_attn.q_proj.dropout.rngs.count[...]), [2, 2])
    if not scan:
        c, d = logits(model, True), logits(model, True)
        np.testing.assert_array_equal(np.asarray(c), np.asarray(d))
        assert float(jnp.max(jnp.abs(a - c))) > 1e-3
