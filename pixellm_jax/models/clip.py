"""CLIP ViT vision tower with HF `CLIPVisionModel` semantics, returning selected patch features.

Pre-LN transformer: conv patch embedding (no bias) + class token + a learned position table (built for
`VisionConfig.image_size`, see `clip_positions`), `pre_layrnorm`, then encoder layers of
attention (q/k/v/out_proj with bias) and a quick-GELU MLP. `post_layernorm` is not built: PixelLM reads
intermediate hidden states only. A key-padding mask hides padded patches from attention (keys only, the
CLS key always valid), as PixelLM's `_CLIPVisionModel` does for images padded to a square.

Norms and softmax run in float32; everything else in the compute `dtype`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pixellm_jax.config import VisionConfig
from pixellm_jax.models.attention import Impl, dot_product_attention
from pixellm_jax.models.layers import axes_meta, layer_norm, linear, param, quick_gelu


def _norm(ln: nnx.LayerNorm, x: jax.Array) -> jax.Array:
    """LayerNorm computed in float32, result in x's dtype (torch's bf16 LayerNorm does the same)."""
    return ln(x.astype(jnp.float32)).astype(x.dtype)


class CLIPVisionEmbeddings(nnx.Module):
    """Patch embedding + class token + position table (`embeddings.*` in HF)."""

    def __init__(self, cfg: VisionConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        d, p = cfg.hidden_size, cfg.patch_size
        self.image_size = cfg.image_size
        self.dtype = dtype
        self.patch_embedding = nnx.Conv(
            3, d, kernel_size=(p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=dtype,
            param_dtype=param_dtype, rngs=rngs, kernel_metadata=axes_meta(("conv", "conv", None, "vision_embed")),
        )
        init = jax.nn.initializers.normal(d**-0.5)
        self.class_embedding = param(rngs, init, (d,), ("vision_embed",), param_dtype)
        self.position_embedding = param(
            rngs, jax.nn.initializers.normal(0.02), (cfg.grid * cfg.grid + 1, d), ("vision_positions", "vision_embed"),
            param_dtype,
        )

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels [B, H, W, 3] (H = W = image_size) -> tokens [B, 1 + grid*grid, hidden], CLS first."""
        if pixels.ndim != 4 or pixels.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"expected pixels [B, {self.image_size}, {self.image_size}, 3] (NHWC), got {pixels.shape}"
            )
        patches = self.patch_embedding(pixels)
        b, gh, gw, d = patches.shape
        patches = patches.reshape(b, gh * gw, d)
        dtype = patches.dtype
        cls = jnp.broadcast_to(self.class_embedding[...].astype(dtype), (b, 1, d))
        tokens = jnp.concatenate([cls, patches], axis=1)
        return tokens + self.position_embedding[...].astype(dtype)[None]


class CLIPAttention(nnx.Module):
    """Multi-head self-attention with biased q/k/v/out projections (`self_attn.*`)."""

    def __init__(
        self, cfg: VisionConfig, *, dtype=None, param_dtype=jnp.float32, attention: Impl = "xla", rngs: nnx.Rngs
    ):
        d = cfg.hidden_size
        self.attention = attention
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = linear(d, d, ("vision_embed", "vision_heads"), **kw)
        self.k_proj = linear(d, d, ("vision_embed", "vision_heads"), **kw)
        self.v_proj = linear(d, d, ("vision_embed", "vision_heads"), **kw)
        self.out_proj = linear(d, d, ("vision_heads", "vision_embed"), **kw)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        b, t, _ = x.shape
        split = (b, t, self.num_heads, self.head_dim)
        q = self.q_proj(x).reshape(split)
        k = self.k_proj(x).reshape(split)
        v = self.v_proj(x).reshape(split)
        out = dot_product_attention(q, k, v, mask, impl=self.attention)
        return self.out_proj(out.reshape(b, t, -1))


class CLIPMLP(nnx.Module):
    """fc1 -> quick-GELU -> fc2 (`mlp.*`)."""

    def __init__(self, cfg: VisionConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = linear(cfg.hidden_size, cfg.intermediate_size, ("vision_embed", "vision_mlp"), **kw)
        self.fc2 = linear(cfg.intermediate_size, cfg.hidden_size, ("vision_mlp", "vision_embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(quick_gelu(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x)) (`encoder.layers[i]`)."""

    def __init__(
        self, cfg: VisionConfig, *, dtype=None, param_dtype=jnp.float32, attention: Impl = "xla", rngs: nnx.Rngs
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ln = dict(eps=cfg.layer_norm_eps, rngs=rngs, dtype=jnp.float32, param_dtype=param_dtype)
        self.self_attn = CLIPAttention(cfg, attention=attention, **kw)
        self.layer_norm1 = layer_norm(cfg.hidden_size, "vision_embed", **ln)
        self.mlp = CLIPMLP(cfg, **kw)
        self.layer_norm2 = layer_norm(cfg.hidden_size, "vision_embed", **ln)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        x = x + self.self_attn(_norm(self.layer_norm1, x), mask)
        return x + self.mlp(_norm(self.layer_norm2, x))


class CLIPEncoder(nnx.Module):
    """The stack of encoder layers (`encoder.layers`)."""

    def __init__(
        self, cfg: VisionConfig, *, dtype=None, param_dtype=jnp.float32, attention: Impl = "xla", rngs: nnx.Rngs
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, attention=attention, rngs=rngs)
        self.layers = nnx.List([CLIPEncoderLayer(cfg, **kw) for _ in range(cfg.num_layers)])


class CLIPVisionTower(nnx.Module):
    """CLIP ViT returning, for each `cfg.feature_layers` entry, that hidden state's patch tokens.

    `feature_layers` index HF's `hidden_states` (length num_layers + 1; 0 = pre_layrnorm(embeddings),
    k = output of layer k; negative counts from the end). Only the layers up to the deepest selected
    state are run. `attention` picks the attention implementation (models/attention.py).
    """

    def __init__(
        self, cfg: VisionConfig, *, dtype=None, param_dtype=jnp.float32, attention: Impl = "xla", rngs: nnx.Rngs
    ):
        n_states = cfg.num_layers + 1
        for layer in cfg.feature_layers:
            if not -n_states <= layer < n_states:
                raise ValueError(f"feature layer {layer} is outside the {n_states} hidden states of the tower")
        self.feature_layers = tuple(layer % n_states for layer in cfg.feature_layers)
        self.grid = cfg.grid
        self.dtype = dtype
        self.embeddings = CLIPVisionEmbeddings(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.pre_layrnorm = layer_norm(
            cfg.hidden_size, "vision_embed", eps=cfg.layer_norm_eps, rngs=rngs, dtype=jnp.float32,
            param_dtype=param_dtype,
        )
        self.encoder = CLIPEncoder(cfg, dtype=dtype, param_dtype=param_dtype, attention=attention, rngs=rngs)

    def __call__(self, pixels: jax.Array, patch_mask: jax.Array | None = None) -> list[jax.Array]:
        """pixels [B, H, W, 3]; patch_mask [B, grid, grid] bool (True = valid) or None.

        Returns one [B, grid*grid, hidden] array (CLS dropped, no post-layernorm) per feature layer.
        """
        if self.dtype is not None:
            pixels = pixels.astype(self.dtype)
        x = self.embeddings(pixels)
        x = _norm(self.pre_layrnorm, x)
        b = x.shape[0]
        mask = None
        if patch_mask is not None:
            if patch_mask.shape != (b, self.grid, self.grid):
                raise ValueError(f"expected patch_mask [{b}, {self.grid}, {self.grid}], got {patch_mask.shape}")
            keys = jnp.concatenate([jnp.ones((b, 1), bool), patch_mask.reshape(b, -1).astype(bool)], axis=1)
            mask = keys[:, None, None, :]
        states = [x]
        for layer in self.encoder.layers[: max(self.feature_layers)]:
            x = layer(x, mask)
            states.append(x)
        return [states[i][:, 1:] for i in self.feature_layers]


def vit_patch_mask(resized_hw: jax.Array, grid: int, patch_size: int) -> jax.Array:
    """[B, grid, grid] bool: patch (i, j) is valid iff patch*i < h' and patch*j < w'.

    resized_hw [B, 2] int holds each image's (h', w') after resizing, before padding to a square; this is
    PixelLM's nearest-neighbour downsampling of the pixel mask to the patch grid.
    """
    start = patch_size * jnp.arange(grid)
    rows = start[None, :] < resized_hw[:, 0:1]
    cols = start[None, :] < resized_hw[:, 1:2]
    return rows[:, :, None] & cols[:, None, :]


def llm_token_mask(resized_hw: jax.Array, llm_grid: int, image_size: int) -> jax.Array:
    """[B, llm_grid**2] bool mask of the LLM's image tokens: (i, j) valid iff s*i < h' and s*j < w',
    s = image_size / llm_grid (PixelLM: 28 for 448 / 16), row-major."""
    if image_size % llm_grid:
        raise ValueError(f"image_size {image_size} is not a multiple of the LLM token grid {llm_grid}")
    mask = vit_patch_mask(resized_hw, llm_grid, image_size // llm_grid)
    return mask.reshape(mask.shape[0], llm_grid * llm_grid)
