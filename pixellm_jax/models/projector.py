"""Vision projections: `mm_projector` (CLIP -> LLM tokens) and `out_mm_projector` (CLIP -> decoder).

Both are Linear -> exact-erf GELU -> Linear (PixelLM: 1024 -> 2H -> H; LLaVA-1.5: 1024 -> H -> H).
`pool_patches` turns the CLIP patch grid into the LLM's image-token grid: PixelLM bilinearly resizes
32x32 -> 16x16 with align_corners=False, which for an integer factor is exactly average pooling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pixellm_jax.models.layers import gelu_exact, linear


class VisionProjector(nnx.Module):
    """Linear(in, hidden) -> GELU(erf) -> Linear(hidden, out); names mirror `mm_projector.{0,2}`."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.linear_1 = linear(in_dim, hidden_dim, ("vision_embed", "mlp"), rngs=rngs, dtype=dtype,
                               param_dtype=param_dtype)
        self.linear_2 = linear(hidden_dim, out_dim, ("mlp", "embed"), rngs=rngs, dtype=dtype,
                               param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(gelu_exact(self.linear_1(x)))


def pool_patches(patches: jax.Array, grid: int, out_grid: int) -> jax.Array:
    """Average-pool row-major patch tokens [B, grid*grid, C] to [B, out_grid*out_grid, C] (in fp32)."""
    if grid % out_grid:
        raise ValueError(f"patch grid {grid} is not a multiple of the token grid {out_grid}")
    if grid == out_grid:
        return patches
    b, n, c = patches.shape
    if n != grid * grid:
        raise ValueError(f"expected {grid * grid} patch tokens, got {n}")
    f = grid // out_grid
    x = patches.astype(jnp.float32).reshape(b, out_grid, f, out_grid, f, c)
    return x.mean(axis=(2, 4)).reshape(b, out_grid * out_grid, c).astype(patches.dtype)
