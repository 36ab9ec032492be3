"""PixelLM's multi-scale pixel decoder: feature neck, prompt-encoder parts and the mask decoder.

Reference: PIXELLM.md §1.4 (neck) and §1.8 (prompt encoder, `MaskDecoderMultiScale`, the scale
combination). Level 0 is the deep feature map at the feature grid (h, w); level l > 0 is its own
feature map upsampled l times by the shared `upsample_2x` to (2^l h, 2^l w) and gated by
`sigmoid(m_{l-1}) + 1`, where m_{l-1} is mask token 0's map of level l-1 (already at that size).
The levels' maps are resized to the last level's size, (2^L h, 2^L w), and mixed with the weights γ.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from pixellm_jax.config import HeadConfig
from pixellm_jax.models.attention import Impl
from pixellm_jax.models.grouped_take import take_in_groups
from pixellm_jax.models.layers import axes_meta, embed, param
from pixellm_jax.models.sam_layers import (
    EMBED,
    MLP,
    LayerNorm2d,
    PositionEmbeddingRandom,
    TwoWayTransformer,
    UpscaleBlock,
)


class FeatureNeck(nnx.Sequential):
    """Conv1x1 (no bias) -> LayerNorm2d -> Conv3x3 pad 1 (no bias) -> LayerNorm2d: H -> C channels.

    One neck shared by all levels (`image_feature_neck.{0..3}` = `layers[0..3]`), [..., h, w, H] in.
    """

    def __init__(
        self, in_dim: int, out_dim: int, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        super().__init__(
            nnx.Conv(
                in_dim, out_dim, (1, 1), use_bias=False, padding="VALID",
                kernel_metadata=axes_meta(("conv", "conv", "embed", EMBED)), **kw,
            ),
            LayerNorm2d(out_dim, **kw),
            nnx.Conv(
                out_dim, out_dim, (3, 3), use_bias=False, padding=((1, 1), (1, 1)),
                kernel_metadata=axes_meta(("conv", "conv", EMBED, EMBED)), **kw,
            ),
            LayerNorm2d(out_dim, **kw),
        )


class PromptEncoder(nnx.Module):
    """The parts of SAM's prompt encoder PixelLM uses: the dense positional encoding and `no_mask_embed`.

    The point embeddings and `mask_downscaling` of the PyTorch module are never used by PixelLM and
    are not built.
    """

    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        self.pe_layer = PositionEmbeddingRandom(dim // 2, rngs=rngs)
        self.no_mask_embed = embed(
            1, dim, ("decoder_tokens", EMBED), rngs=rngs, dtype=dtype, param_dtype=param_dtype,
            init=jax.nn.initializers.normal(1.0),
        )

    def dense_pe(self, h: int, w: int) -> jax.Array:
        """Positional encoding of an h x w grid, [h, w, dim] float32 (`get_dense_pe`)."""
        return self.pe_layer(h, w)

    def no_mask_embedding(self) -> jax.Array:
        """The dense prompt of every pixel when no mask is given, [dim]."""
        return self.no_mask_embed.embedding[...][0]


class MultiScaleMaskDecoder(nnx.Module):
    """`MaskDecoderMultiScale` generalised to `head.scale_num` levels, batched over targets.

    Only mask token 0 makes masks (`multimask_output=False`), so only `output_hypernetworks_mlps[0]`
    is evaluated; the other hypernetwork MLPs and `iou_prediction_head` are kept because the
    checkpoints hold them, but the official model never uses their outputs. `attention` picks the
    attention implementation of the two-way transformers (models/attention.py).
    """

    def __init__(
        self, head: HeadConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32, attention: Impl = "xla"
    ):
        dim, levels = head.out_dim, head.scale_num
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.transformer = nnx.List(
            TwoWayTransformer(
                head.decoder_depth, dim, head.decoder_heads, head.decoder_mlp_dim, head.attention_downsample,
                attention=attention, **kw,
            )
            for _ in range(levels)
        )
        init = jax.nn.initializers.normal(1.0)  # nn.Embedding's default
        self.iou_token = embed(1, dim, ("decoder_tokens", EMBED), init=init, **kw)
        self.mask_tokens = embed(head.num_mask_tokens, dim, ("decoder_tokens", EMBED), init=init, **kw)
        self.level_embed = embed(levels, dim, ("decoder_tokens", EMBED), init=init, **kw)
        self.output_upscaling = UpscaleBlock(dim, dim // 8, **kw)
        if levels > 1:
            self.upsample_2x = UpscaleBlock(dim, dim, **kw)
            self.pe1 = PositionEmbeddingRandom(dim // 2, rngs=rngs)
        self.output_hypernetworks_mlps = nnx.List(MLP(dim, dim, dim // 8, 3, **kw) for _ in range(head.num_mask_tokens))
        self.iou_prediction_head = MLP(dim, dim, head.num_mask_tokens, 3, **kw)
        if head.scale_fusion == "paper":
            self.scale_logits = param(rngs, jax.nn.initializers.zeros, (levels,), (None,))
        self.scale_fusion = head.scale_fusion
        self.levels = levels
        self.dtype = dtype

    def scale_weights(self) -> jax.Array:
        """γ: fixed 1/L per level (official) or softmax of learned logits, equal at init (paper)."""
        if self.scale_fusion == "paper":
            return jax.nn.softmax(self.scale_logits[...].astype(jnp.float32))
        return jnp.full((self.levels,), 1.0 / self.levels, jnp.float32)

    def __call__(
        self,
        features: Sequence[jax.Array],
        prompts: jax.Array,
        image_index: jax.Array,
        prompt_encoder: PromptEncoder,
        *,
        return_levels: bool = False,
        image_groups: int = 1,
    ) -> jax.Array | tuple[jax.Array, list[jax.Array]]:
        """Mask logits [n_tgt, 2^L h, 2^L w] for every target (128 x 128 for L=2 on a 32 x 32 grid).

        features: L neck outputs [n_img, h, w, C], deep level first. prompts: [n_tgt, L, C], one
        fused prompt per level. image_index: [n_tgt] int32, the image of each target (clipped into
        range, so padding rows may hold any index; with `image_groups` > 1, into the target's block,
        see `grouped_take`). With `return_levels`, also the per-level logits of mask token 0, level l
        at (2^(l+1) h, 2^(l+1) w).
        """
        if len(features) != self.levels or prompts.shape[1] != self.levels:
            raise ValueError(
                f"decoder has {self.levels} levels; got {len(features)} feature maps and prompts {prompts.shape}"
            )
        dtype = self.dtype or prompts.dtype
        n = prompts.shape[0]
        out_tokens = jnp.concatenate([self.iou_token.embedding[...], self.mask_tokens.embedding[...]], axis=0)
        dense = prompt_encoder.no_mask_embedding().astype(dtype)
        gamma = self.scale_weights()

        level_masks = []
        for l in range(self.levels):
            tokens = jnp.concatenate(
                [jnp.broadcast_to(out_tokens, (n, *out_tokens.shape)), prompts[:, l : l + 1].astype(out_tokens.dtype)],
                axis=1,
            )
            tokens = (tokens + self.level_embed.embedding[...][l]).astype(dtype)

            feats = features[l].astype(dtype)
            for _ in range(l):
                feats = self.upsample_2x(feats)
            src = take_in_groups(feats, image_index, image_groups)
            _, h, w, c = src.shape
            if l == 0:
                pe = prompt_encoder.dense_pe(h, w)
            else:
                src = src * (jax.nn.sigmoid(level_masks[-1])[..., None] + 1)
                pe = self.pe1(h, w)
            src = src + dense

            hs, keys = self.transformer[l](src, pe[None].astype(dtype), tokens)
            upscaled = self.output_upscaling(keys.reshape(n, h, w, c))
            hyper = self.output_hypernetworks_mlps[0](hs[:, 1])
            level_masks.append(jnp.einsum("nc,nhwc->nhw", hyper, upscaled))

        size = level_masks[-1].shape[1:]
        logits = jnp.zeros((n, *size), dtype)
        for l, m in enumerate(level_masks):
            if m.shape[1:] != size:
                m = jax.image.resize(m.astype(jnp.float32), (n, *size), "linear").astype(dtype)
            logits = logits + (gamma[l] * m).astype(dtype)
        if return_levels:
            return logits, level_masks
        return logits
