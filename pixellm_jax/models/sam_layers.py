"""Segment-anything building blocks in Flax NNX, channels-last.

The PixelLM pixel decoder is SAM's mask decoder extended to several feature levels; these are the SAM
parts it is made of (`segment_anything/modeling/{common,transformer,prompt_encoder,mask_decoder}.py`),
with attribute names equal to the PyTorch ones so checkpoints map key for key. Image maps are
[batch, h, w, channels] here (PyTorch: [batch, channels, h, w]).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from pixellm_jax.models.attention import Impl, dot_product_attention
from pixellm_jax.models.layers import axes_meta, gelu_exact, layer_norm, linear

EMBED = "decoder_embed"
INNER = "decoder_mlp"


class Buffer(nnx.Variable):
    """A saved, never-trained array (PyTorch `register_buffer`); keeps its logical axis names."""


class LayerNorm2d(nnx.LayerNorm):
    """SAM's LayerNorm2d on channels-last maps: each pixel normalised over channels (biased variance)."""

    def __init__(
        self, channels: int, *, eps: float = 1e-6, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32
    ):
        super().__init__(
            channels,
            epsilon=eps,
            use_fast_variance=False,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
            scale_metadata=axes_meta((EMBED,)),
            bias_metadata=axes_meta((EMBED,)),
        )


class BlockConvTranspose(nnx.ConvTranspose):
    """A transposed convolution whose stride equals its kernel size, computed as one einsum.

    With no overlap each input pixel writes its own kh x kw output block, so the layer is a matmul
    followed by a reshape. Same parameters (and checkpoint paths) as `nnx.ConvTranspose`; XLA:CPU
    runs the convolution's weight gradient on a slow generic path (a third of a train step), the
    einsum as plain matmuls.
    """

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...][::-1, ::-1]  # flax's transposed-conv kernel is the spatially flipped one
        kh, kw, _, out = kernel.shape
        if tuple(self.strides) != (kh, kw):
            raise ValueError(f"BlockConvTranspose needs strides equal to the kernel size, got {self.strides}")
        dtype = self.dtype or jnp.result_type(x, kernel)
        n, h, w, _ = x.shape
        y = jnp.einsum("nhwc,abco->nhawbo", x.astype(dtype), kernel.astype(dtype)).reshape(n, h * kh, w * kw, out)
        return y + self.bias[...].astype(dtype) if self.bias is not None else y


class UpscaleBlock(nnx.Sequential):
    """ConvTranspose2d(k=2, s=2) -> LayerNorm2d -> GELU: SAM's `output_upscaling` stage, 2x per side.

    The kernel is [kh, kw, in, out]; a PyTorch ConvTranspose2d weight [in, out, kh, kw] maps to it by
    `permute(2, 3, 0, 1)` followed by a flip of both spatial axes.
    """

    def __init__(
        self, in_channels: int, out_channels: int, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32
    ):
        conv = BlockConvTranspose(
            in_channels,
            out_channels,
            (2, 2),
            (2, 2),
            padding="VALID",
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
            kernel_metadata=axes_meta(("conv", "conv", EMBED, EMBED)),
            bias_metadata=axes_meta((EMBED,)),
        )
        norm = LayerNorm2d(out_channels, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        super().__init__(conv, norm, gelu_exact)


class MLPBlock(nnx.Module):
    """Two-layer feed-forward block `lin2(act(lin1(x)))` (SAM's MLPBlock; ReLU in the two-way transformer)."""

    def __init__(
        self,
        dim: int,
        mlp_dim: int,
        *,
        act: Callable[[jax.Array], jax.Array] = jax.nn.relu,
        rngs: nnx.Rngs,
        dtype=None,
        param_dtype=jnp.float32,
    ):
        self.lin1 = linear(dim, mlp_dim, (EMBED, INNER), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.lin2 = linear(mlp_dim, dim, (INNER, EMBED), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.lin2(self.act(self.lin1(x)))


class MLP(nnx.Module):
    """`num_layers` Linear layers with ReLU between them (SAM's hypernetwork / IoU-head MLP)."""

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_layers: int,
        *,
        rngs: nnx.Rngs,
        dtype=None,
        param_dtype=jnp.float32,
    ):
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nnx.List(
            linear(a, b, (EMBED, EMBED), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
            for a, b in zip(dims[:-1], dims[1:])
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = jax.nn.relu(x)
        return x


class Attention(nnx.Module):
    """Multi-head attention whose q/k/v projections shrink the width by `downsample_rate`."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        downsample_rate: int = 1,
        *,
        rngs: nnx.Rngs,
        dtype=None,
        param_dtype=jnp.float32,
        attention: Impl = "xla",
    ):
        inner = dim // downsample_rate
        if inner % num_heads:
            raise ValueError(f"{num_heads} heads do not divide the attention width {inner} (= {dim}/{downsample_rate})")
        self.num_heads = num_heads
        self.attention = attention
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = linear(dim, inner, (EMBED, INNER), **kw)
        self.k_proj = linear(dim, inner, (EMBED, INNER), **kw)
        self.v_proj = linear(dim, inner, (EMBED, INNER), **kw)
        self.out_proj = linear(inner, dim, (INNER, EMBED), **kw)

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """q [b, nq, dim], k and v [b, nk, dim] -> [b, nq, dim]; no mask (every key is real)."""

        def heads(x):
            return x.reshape(*x.shape[:-1], self.num_heads, x.shape[-1] // self.num_heads)

        q, k, v = heads(self.q_proj(q)), heads(self.k_proj(k)), heads(self.v_proj(v))
        out = dot_product_attention(q, k, v, impl=self.attention)
        return self.out_proj(out.reshape(*out.shape[:-2], -1))


class TwoWayAttentionBlock(nnx.Module):
    """Token self-attention, token->image attention, MLP, image->token attention, each post-normed.

    With `skip_first_layer_pe` (layer 0) the self-attention sees no positional encoding and its
    output replaces the tokens instead of being added to them, exactly as SAM does.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        downsample_rate: int,
        skip_first_layer_pe: bool,
        *,
        rngs: nnx.Rngs,
        dtype=None,
        param_dtype=jnp.float32,
        attention: Impl = "xla",
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        attn = dict(kw, attention=attention)
        self.self_attn = Attention(dim, num_heads, **attn)
        self.norm1 = layer_norm(dim, EMBED, eps=1e-5, **kw)
        self.cross_attn_token_to_image = Attention(dim, num_heads, downsample_rate, **attn)
        self.norm2 = layer_norm(dim, EMBED, eps=1e-5, **kw)
        self.mlp = MLPBlock(dim, mlp_dim, **kw)
        self.norm3 = layer_norm(dim, EMBED, eps=1e-5, **kw)
        self.norm4 = layer_norm(dim, EMBED, eps=1e-5, **kw)
        self.cross_attn_image_to_token = Attention(dim, num_heads, downsample_rate, **attn)
        self.skip_first_layer_pe = skip_first_layer_pe

    def __call__(
        self, queries: jax.Array, keys: jax.Array, query_pe: jax.Array, key_pe: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, k, keys))
        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nnx.Module):
    """SAM's two-way transformer: prompt tokens and image pixels attend to each other `depth` times."""

    def __init__(
        self,
        depth: int,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        downsample_rate: int = 2,
        *,
        rngs: nnx.Rngs,
        dtype=None,
        param_dtype=jnp.float32,
        attention: Impl = "xla",
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        attn = dict(kw, attention=attention)
        self.layers = nnx.List(
            TwoWayAttentionBlock(dim, num_heads, mlp_dim, downsample_rate, i == 0, **attn) for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(dim, num_heads, downsample_rate, **attn)
        self.norm_final_attn = layer_norm(dim, EMBED, eps=1e-5, **kw)

    def __call__(
        self, image: jax.Array, image_pe: jax.Array, tokens: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """image [b, h, w, dim], image_pe broadcastable to it, tokens [b, n, dim].

        Returns (tokens [b, n, dim], image [b, h*w, dim]); the input tokens are their own PE.
        """
        b, h, w, c = image.shape
        keys = image.reshape(b, h * w, c)
        key_pe = jnp.broadcast_to(image_pe, (image_pe.shape[0], h, w, c)).reshape(-1, h * w, c)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        out = self.final_attn_token_to_image(queries + tokens, keys + key_pe, keys)
        return self.norm_final_attn(queries + out), keys


class PositionEmbeddingRandom(nnx.Module):
    """Random Fourier features of pixel-centre coordinates (SAM); the frequency matrix is a buffer."""

    def __init__(self, num_pos_feats: int, *, rngs: nnx.Rngs):
        self.positional_encoding_gaussian_matrix = Buffer(
            jax.random.normal(rngs.params(), (2, num_pos_feats), jnp.float32), **axes_meta((None, EMBED))
        )

    def __call__(self, h: int, w: int) -> jax.Array:
        """Dense encoding [h, w, 2*num_pos_feats] (sin then cos), float32, for an h x w grid."""
        x = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
        y = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
        coords = jnp.stack(jnp.broadcast_arrays(x[None, :], y[:, None]), axis=-1)
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix[...].astype(jnp.float32)
        coords = 2 * math.pi * coords
        return jnp.concatenate([jnp.sin(coords), jnp.cos(coords)], axis=-1)
