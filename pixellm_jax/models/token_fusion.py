"""Codebook-state projection (`text_hidden_fcs`) and token fusion φ (reference §1.6, §1.7).

`TextHiddenFcs` maps LLM hidden states to the decoder width. `TokenFusion` turns the N states of
each level into one prompt embedding:

* `official`: the released code's fixed scalars, 1/(N·L) per token summed over the level's N tokens
  (half the mean for N=3, L=2). The scalars are unregistered Python-list parameters upstream, so
  they are constants here, never trained; the constant is rounded to the compute dtype (bf16:
  0.1669921875) and the sum follows the official order `acc = e0*0; acc += s*e0; acc += s*e1; ...`
  with every step rounded to the compute dtype, for bit parity in bf16.
* `paper`: the learned linear projection φ of the paper (§3.1, "a linear projection layer φ ...
  h^ℓ = φ(h_1^ℓ, ..., h_N^ℓ)"): one Linear(N·D → D) over the concatenated N states, shared by all
  levels (the paper names a single φ). It starts at the official fusion (kernel = N stacked
  identities / (N·L), bias 0) so a paper-mode run from a released checkpoint starts from the same
  function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pixellm_jax.config import HeadConfig
from pixellm_jax.models.layers import linear


class TextHiddenFcs(nnx.Module):
    """Linear(H, H) → ReLU → Linear(H, out_dim), applied per position.

    Official keys `text_hidden_fcs.0.0.*` map to `fc1`, `text_hidden_fcs.0.2.*` to `fc2`.
    """

    def __init__(self, hidden_size: int, out_dim: int, *, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.fc1 = linear(hidden_size, hidden_size, ("embed", "mlp"), rngs=rngs, dtype=dtype,
                          param_dtype=param_dtype)
        self.fc2 = linear(hidden_size, out_dim, ("mlp", "decoder_embed"), rngs=rngs, dtype=dtype,
                          param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., H] -> [..., out_dim]."""
        return self.fc2(jax.nn.relu(self.fc1(x)))


def _official_init(n: int, l: int, dim: int):
    def init(key, shape, dtype=jnp.float32):
        del key
        return (jnp.tile(jnp.eye(dim, dtype=jnp.float32), (n, 1)) / (n * l)).astype(dtype).reshape(shape)

    return init


class TokenFusion(nnx.Module):
    """Fuse the N codebook states of each level: [..., L, N, D] -> [..., L, D]."""

    def __init__(self, head: HeadConfig, *, dim: int | None = None, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.mode = head.token_fusion
        self.n = head.seg_token_num
        self.l = head.scale_num
        self.dim = head.out_dim if dim is None else dim
        self.dtype = dtype
        if self.mode == "paper":
            self.phi = linear(self.n * self.dim, self.dim, ("decoder_embed", "decoder_embed"), rngs=rngs,
                              dtype=dtype, param_dtype=param_dtype,
                              kernel_init=_official_init(self.n, self.l, self.dim))
        elif self.mode != "official":
            raise ValueError(f"model.head.token_fusion: unknown mode {self.mode!r}")

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-3:] != (self.l, self.n, self.dim):
            raise ValueError(f"token fusion expects [..., L={self.l}, N={self.n}, D={self.dim}], got {x.shape}")
        if self.mode == "paper":
            return self.phi(x.reshape(*x.shape[:-2], self.n * self.dim))
        return self._official(x)

    def _official(self, x: jax.Array) -> jax.Array:
        dt = jnp.dtype(self.dtype or x.dtype)
        info = jnp.finfo(dt)

        def rnd(v):  # round to the compute dtype even if XLA keeps wider intermediates
            return jax.lax.reduce_precision(v, exponent_bits=info.nexp, mantissa_bits=info.nmant)

        e = x.astype(dt).astype(jnp.float32)
        s = jnp.asarray(1.0 / (self.n * self.l), jnp.float32).astype(dt).astype(jnp.float32)
        acc = e[..., 0, :] * 0
        for i in range(self.n):
            acc = rnd(acc + rnd(s * e[..., i, :]))
        return acc.astype(dt)
