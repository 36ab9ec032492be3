"""The attention implementations of models/attention.py against the "xla" parity path.

CPU: "jax" equals "xla" (causal + left/right padding, GQA, key padding over a different key length);
the tiny LLaMA gives the same logits with `model.attention=jax`; the config setting reaches every
attention module of PixelLM; config validation names the key. The Pallas splash kernel runs in
interpret mode on CPU (causal + padding, GQA, key padding, gradients) and the key-padding
derivation rejects masks segment ids cannot express. "cudnn" and "pallas_tpu" compile and are
compared when a GPU / TPU backend is present.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixellm_jax.config import ConfigError, load_config
from pixellm_jax.models.attention import _key_padding, _splash_attention, dot_product_attention
from pixellm_jax.models.llama import LlamaModel

BACKEND = jax.default_backend()


def _qkv(b, t, s, heads, kv_heads, d, seed=0, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    q = r.normal(size=(b, t, heads, d))
    k = r.normal(size=(b, s, kv_heads, d))
    v = r.normal(size=(b, s, kv_heads, d))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _padding(lengths, total, left=False):
    """[B, total] validity for sequences of the given lengths, padded on the right (or left)."""
    idx = np.arange(total)[None, :]
    n = np.asarray(lengths)[:, None]
    return jnp.asarray(idx >= total - n if left else idx < n)


def _rows_with_keys(key_valid, t, causal):
    """[B, T] bool: query rows that may attend to at least one key (the others are fully masked)."""
    key_valid = np.asarray(key_valid)
    if not causal:
        return np.broadcast_to(key_valid.any(-1, keepdims=True), (key_valid.shape[0], t))
    return np.maximum.accumulate(key_valid[:, :t], axis=1)


# (batch, q_len, kv_len, heads, kv_heads, head_dim, causal, left-padded)
CASES = {
    "causal_right_pad": (2, 12, 12, 4, 4, 8, True, False),
    "causal_left_pad_gqa": (2, 12, 12, 4, 2, 8, True, True),
    "key_pad_cross": (2, 5, 9, 2, 1, 8, False, False),
}


def _case(name):
    b, t, s, h, kvh, d, causal, left = CASES[name]
    q, k, v = _qkv(b, t, s, h, kvh, d)
    key_valid = _padding([s, s - 4], s, left=left)
    return q, k, v, key_valid, causal


@pytest.mark.parametrize("name", sorted(CASES))
def test_jax_matches_xla(name):
    q, k, v, key_valid, causal = _case(name)
    mask = key_valid[:, None, None, :]
    ref = dot_product_attention(q, k, v, mask, causal=causal, impl="xla")
    out = dot_product_attention(q, k, v, mask, causal=causal, impl="jax")
    assert out.shape == q.shape
    assert bool(jnp.isfinite(out).all())
    # Fully-masked rows included: both give the uniform average of the values.
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)
    # The causal flag is the same pattern as folding it into a dense mask.
    tril = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
    dense = mask & tril if causal else mask
    np.testing.assert_array_equal(np.asarray(dot_product_attention(q, k, v, dense, impl="xla")), np.asarray(ref))


def test_tiny_llama_jax_attention_matches_xla():
    """The tiny config's LLaMA, same weights, attention "jax" vs "xla": with and without the KV cache."""
    cfg = load_config("tiny", ["model.attention=jax"])
    assert cfg.model.attention == "jax"
    text = cfg.model.text
    ref = LlamaModel(text, None, attention="xla", rngs=nnx.Rngs(0))
    ours = LlamaModel(text, None, attention=cfg.model.attention, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(1).integers(0, text.vocab_size, (2, 10)), jnp.int32)
    valid = _padding([10, 6], 10, left=True)

    @nnx.jit
    def run(model, ids, valid):
        full = model(ids, valid).logits
        cache = model.init_cache(2, 12)
        prefill = model(ids[:, :9], valid[:, :9], cache=cache)
        step = model(ids[:, 9:], valid[:, 9:], cache=prefill.cache)
        return full, prefill.logits, step.logits

    for a, b in zip(run(ref, ids, valid), run(ours, ids, valid)):
        assert bool(jnp.isfinite(b).all())
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=0)


def test_model_attention_reaches_every_attention():
    from pixellm_jax.models.clip import CLIPAttention
    from pixellm_jax.models.llama import LlamaAttention
    from pixellm_jax.models.pixellm import PixelLM
    from pixellm_jax.models.sam_layers import Attention

    cfg = load_config("tiny", ["model.attention=jax"]).model
    model = nnx.eval_shape(lambda: PixelLM(cfg, rngs=nnx.Rngs(0)))
    found = {LlamaAttention: [], CLIPAttention: [], Attention: []}
    for _, module in nnx.iter_graph(model):
        if type(module) in found:
            found[type(module)].append(module.attention)
    for kind, impls in found.items():
        assert impls and set(impls) == {"jax"}, kind.__name__


def test_config_rejects_unknown_attention():
    with pytest.raises(ConfigError, match="model.attention"):
        load_config("tiny", ["model.attention=flash"])
    with pytest.raises(ConfigError, match="model.attention"):
        load_config("tiny", ["model.attention=cudnn", "model.dtype=float32"])
    assert load_config("tiny").model.attention == "xla"


def test_unknown_impl_and_wrong_backend_raise():
    q, k, v, key_valid, _ = _case("causal_right_pad")
    with pytest.raises(ValueError, match="not one of"):
        dot_product_attention(q, k, v, impl="flash")
    if BACKEND != "tpu":
        with pytest.raises(ValueError, match="needs a TPU"):
            dot_product_attention(q, k, v, key_valid[:, None, None, :], causal=True, impl="pallas_tpu")
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        dot_product_attention(q, k, v, impl="cudnn")


def test_key_padding_derivation():
    """Pallas segment ids come from pure key-padding masks; anything query- or head-dependent raises."""
    valid = _padding([6, 3], 6)
    np.testing.assert_array_equal(np.asarray(_key_padding(valid[:, None, None, :], 2, 6)), np.asarray(valid))
    np.testing.assert_array_equal(np.asarray(_key_padding(jnp.ones((1, 1, 1, 6), bool), 2, 6)), np.ones((2, 6)))
    assert _key_padding(None, 2, 6) is None
    causal_dense = jnp.tril(jnp.ones((6, 6), bool))[None, None] & valid[:, None, None, :]
    with pytest.raises(ValueError, match="varies over heads or queries"):
        _key_padding(causal_dense, 2, 6)
    with pytest.raises(ValueError, match="varies over heads or queries"):
        _key_padding(jnp.ones((2, 4, 1, 6), bool), 2, 6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_splash_interpret_matches_xla(name):
    """The Pallas kernel (interpret mode) with causal + segment ids equals xla's `mask & causal`."""
    q, k, v, key_valid, causal = _case(name)
    scale = q.shape[-1] ** -0.5
    ref = dot_product_attention(q, k, v, key_valid[:, None, None, :], causal=causal, impl="xla")
    out = _splash_attention(q, k, v, key_valid, causal=causal, scale=scale, interpret=True)
    assert out.shape == q.shape
    assert bool(jnp.isfinite(out).all())  # fully-masked rows included
    rows = _rows_with_keys(key_valid, q.shape[1], causal)
    assert not rows.all() if name == "causal_left_pad_gqa" else rows.all()
    np.testing.assert_allclose(np.asarray(out)[rows], np.asarray(ref)[rows], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_splash_interpret_gradients_match_xla():
    """Backward kernels (dq, dk, dv) with causal + left padding + GQA; padded query rows carry no loss."""
    q, k, v, key_valid, causal = _case("causal_left_pad_gqa")
    rows = jnp.asarray(_rows_with_keys(key_valid, q.shape[1], causal))[:, :, None, None]
    w = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)
    scale = q.shape[-1] ** -0.5

    def loss(fn, q, k, v):
        return jnp.sum(jnp.where(rows, fn(q, k, v) * w, 0.0))

    def xla(q, k, v):
        return dot_product_attention(q, k, v, key_valid[:, None, None, :], causal=causal, impl="xla")

    def splash(q, k, v):
        return _splash_attention(q, k, v, key_valid, causal=causal, scale=scale, interpret=True)

    ref = jax.grad(lambda *a: loss(xla, *a), argnums=(0, 1, 2))(q, k, v)
    out = jax.grad(lambda *a: loss(splash, *a), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ref, out):
        assert bool(jnp.isfinite(b).all())
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=0)


def _accelerator_cases(dtype):
    """Accelerator-sized cases (head_dim 128, lengths over one 128 block) in `dtype`."""
    cases = ((True, 8, 256, 256, True), (True, 2, 200, 200, False), (False, 4, 77, 300, False))
    for causal, kv_heads, t, s, left in cases:
        q, k, v = _qkv(2, t, s, 8, kv_heads, 128, seed=3, dtype=dtype)
        yield q, k, v, _padding([s, s - 37], s, left=left), causal


def _check_against_xla(impl, dtype, atol):
    for q, k, v, key_valid, causal in _accelerator_cases(dtype):
        mask = key_valid[:, None, None, :]
        with jax.default_matmul_precision("highest"):
            ref = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, mask, causal=causal, impl="xla"))(
                *(x.astype(jnp.float32) for x in (q, k, v))
            )
        out = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, mask, causal=causal, impl=impl))(q, k, v)
        assert out.dtype == dtype and bool(jnp.isfinite(out).all())
        rows = _rows_with_keys(key_valid, q.shape[1], causal)
        np.testing.assert_allclose(np.asarray(out, np.float32)[rows], np.asarray(ref)[rows], atol=atol, rtol=0)


@pytest.mark.skipif(BACKEND != "gpu", reason="cuDNN attention needs a GPU backend (jax.default_backend() != 'gpu')")
def test_cudnn_matches_xla_on_gpu():
    _check_against_xla("cudnn", jnp.bfloat16, atol=3e-2)


@pytest.mark.skipif(
    BACKEND != "tpu", reason="Pallas TPU attention needs a TPU backend (jax.default_backend() != 'tpu')"
)
@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 1e-2), (jnp.bfloat16, 3e-2)])
def test_pallas_tpu_matches_xla_on_tpu(dtype, atol):
    _check_against_xla("pallas_tpu", dtype, atol)
