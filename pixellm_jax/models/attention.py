"""The one attention function every transformer in the project calls.

Inputs are [batch, length, heads, head_dim]; `mask` is boolean (True = may attend), broadcastable to
[batch, heads, q_len, kv_len]. Padding must always be given explicitly in `mask`. Grouped-query
attention is handled by repeating key/value heads. Softmax runs in float32 and masked scores use
`finfo(float32).min` (not -inf), as HF eager attention does, so fully-masked rows stay finite.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Impl = Literal["xla"]


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    *,
    scale: float | None = None,
    impl: Impl = "xla",
) -> jax.Array:
    """softmax(q k^T * scale + mask) v, output [batch, q_len, heads, head_dim] in q's dtype."""
    if impl != "xla":
        raise ValueError(f"attention impl {impl!r} is not available; known: 'xla'")
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads != kv_heads:
        if heads % kv_heads:
            raise ValueError(f"{heads} query heads is not a multiple of {kv_heads} key/value heads")
        k = jnp.repeat(k, heads // kv_heads, axis=2)
        v = jnp.repeat(v, heads // kv_heads, axis=2)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)
