"""The one attention function every transformer in the project calls, with selectable kernels.

Inputs are [batch, length, heads, head_dim]. The attention pattern is `mask` (boolean, True = may
attend, broadcastable to [batch, heads, q_len, kv_len]) AND, when `causal`, key j <= query i with
both counted from 0. Padding must always be given explicitly in `mask`; `causal` never stands in
for it. Grouped-query attention (fewer key/value heads) is accepted by every implementation.

Implementations (`impl`, chosen by `ModelConfig.attention`):
- "xla": einsum + float32 softmax, masked scores set to `finfo(float32).min` (not -inf) as HF eager
  attention does. The parity reference; key/value heads are repeated for GQA.
- "jax": `jax.nn.dot_product_attention` with `implementation=None` (XLA's fused attention today;
  testable on CPU). The pattern is passed as a dense boolean mask.
- "cudnn": the same function with `implementation="cudnn"` (NVIDIA GPUs, bfloat16/float16 only;
  float32 inputs raise rather than being silently downcast).
- "pallas_tpu": the Pallas splash-attention kernel. `causal` becomes its static causal mask and
  `mask` must be pure key padding ([batch, 1, 1, kv_len]-broadcastable), which becomes segment ids
  (query id 1; key id 1 if valid, 0 if padding), an exact encoding of `mask & causal`. Any other
  mask raises. Lengths are padded to multiples of 128 internally (padded keys get id 0).

Fully-masked query rows (e.g. left-padding queries before the first real token) stay finite
everywhere, but their values differ by path: "xla" and "jax" give the uniform average of all values;
"cudnn" gives what cuDNN computes with jax's large-negative bias (an average of values); "pallas_tpu"
gives the uniform average over the key blocks the kernel visits. The models only use outputs at
real query positions, so they are indifferent to these values.
"""

from __future__ import annotations

from typing import Literal, get_args

import jax
import jax.numpy as jnp

Impl = Literal["xla", "jax", "cudnn", "pallas_tpu"]
IMPLS: tuple[str, ...] = get_args(Impl)

_LANES = 128  # splash kernels tile lengths in multiples of this


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
    impl: Impl = "xla",
) -> jax.Array:
    """softmax(q k^T * scale, restricted to `mask` [& causal]) v -> [batch, q_len, heads, head_dim]."""
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads is not a multiple of {kv_heads} key/value heads")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if impl == "pallas_tpu":
        if jax.default_backend() != "tpu":
            raise ValueError(f"attention impl 'pallas_tpu' needs a TPU backend, not {jax.default_backend()!r}")
        return _splash_attention(q, k, v, _key_padding(mask, q.shape[0], k.shape[1]), causal=causal, scale=scale)
    dense = _dense_mask(mask, causal, q.shape[0], q.shape[1], k.shape[1])
    if impl == "xla":
        return _xla_attention(q, k, v, dense, scale)
    if impl in ("jax", "cudnn"):
        if impl == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
            raise ValueError(f"attention impl 'cudnn' needs bfloat16 or float16 inputs, got {q.dtype}")
        return jax.nn.dot_product_attention(
            q, k, v, mask=dense, scale=scale, implementation="cudnn" if impl == "cudnn" else None
        )
    raise ValueError(f"attention impl {impl!r} is not one of {list(IMPLS)}")


def _dense_mask(mask: jax.Array | None, causal: bool, batch: int, q_len: int, kv_len: int) -> jax.Array | None:
    """`mask & causal` as a [batch, 1 or heads, q_len, kv_len] boolean array (None if unrestricted)."""
    if causal:
        tril = jnp.arange(kv_len)[None, :] <= jnp.arange(q_len)[:, None]
        mask = tril if mask is None else jnp.logical_and(mask, tril)
    if mask is None:
        return None
    mask = jnp.asarray(mask, bool)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    return jnp.broadcast_to(mask, (batch, mask.shape[1], q_len, kv_len))


def _xla_attention(q, k, v, mask: jax.Array | None, scale: float) -> jax.Array:
    """The parity path: plain einsums, float32 softmax, finfo.min for masked scores."""
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads != kv_heads:
        k = jnp.repeat(k, heads // kv_heads, axis=2)
        v = jnp.repeat(v, heads // kv_heads, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _key_padding(mask: jax.Array | None, batch: int, kv_len: int) -> jax.Array | None:
    """The per-key validity [batch, kv_len] of a pure key-padding mask, or None for no mask.

    Raises ValueError for a mask that varies over heads or queries: segment ids cannot express it.
    """
    if mask is None:
        return None
    mask = jnp.asarray(mask, bool)
    shape = (1,) * (4 - mask.ndim) + mask.shape
    if shape[1] != 1 or shape[2] != 1:
        raise ValueError(
            "attention impl 'pallas_tpu' takes `causal` plus a key-padding mask broadcastable to "
            f"[batch, 1, 1, kv_len]; got a mask of shape {mask.shape}, which varies over heads or queries"
        )
    return jnp.broadcast_to(mask.reshape(shape)[:, 0, 0, :], (batch, kv_len))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _block(length: int) -> int:
    """The largest of 512/256/128 dividing `length` (a multiple of 128)."""
    return next(b for b in (512, 256, _LANES) if length % b == 0)


def _splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_valid: jax.Array | None,
    *,
    causal: bool,
    scale: float,
    interpret: bool = False,
) -> jax.Array:
    """Pallas splash attention: static causal mask, key padding as segment ids; `interpret` runs on CPU."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, t, h, _ = q.shape
    s = k.shape[1]
    tp, sp = _round_up(t, _LANES), _round_up(s, _LANES)
    # splash has no softmax scale: fold it into q (computed in float32, stored in q's dtype).
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
    q = jnp.pad(q.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, tp - t), (0, 0)))
    k, v = (jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, sp - s), (0, 0))) for x in (k, v))

    bq, bkv = _block(tp), _block(sp)
    blocks = sa.BlockSizes(
        block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv,
    )
    pattern = sa.CausalMask((tp, sp)) if causal else sa.FullMask((tp, sp))
    kernel = sa.make_splash_mha(
        sa.MultiHeadMask([pattern] * h), block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret
    )
    if key_valid is None and sp == s:
        out = jax.vmap(kernel)(q, k, v)
    else:
        valid = jnp.ones((b, s), bool) if key_valid is None else key_valid
        kv_ids = jnp.pad(valid, ((0, 0), (0, sp - s))).astype(jnp.int32)
        segments = sa.SegmentIds(q=jnp.ones((b, tp), jnp.int32), kv=kv_ids)
        out = jax.vmap(kernel)(q, k, v, segment_ids=segments)
    return out[:, :, :t].transpose(0, 2, 1, 3)
