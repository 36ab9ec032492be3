"""The whole PixelLM: CLIP -> projectors -> LLaMA (+LoRA) -> codebook states -> pixel decoder.

Data flow (reference §1–§2): the CLIP tower gives the deep and shallow patch features; the deep ones,
pooled to the LLM's image-token grid and projected by `mm_projector`, are spliced into the text at
the image sentinel; every level's features go through `out_mm_projector` and the shared neck to the
decoder. The hidden state that predicts each codebook token is gathered, passed through
`text_hidden_fcs`, fused per level and decoded, with the image's features, into one mask per target.

Batches have fixed shapes: `Q` conversation rows, each pointing at one of `B` images
(`conv_image`), each carrying at most `head.max_targets` targets.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pixellm_jax.config import ModelConfig
from pixellm_jax.models.clip import CLIPVisionTower, llm_token_mask, vit_patch_mask
from pixellm_jax.models.codebook import SegGather, gather_seg_states
from pixellm_jax.models.grouped_take import take_in_groups
from pixellm_jax.models.llama import LlamaModel, LlamaOutput
from pixellm_jax.models.multimodal import Spliced, splice_image_tokens
from pixellm_jax.models.pixel_decoder import FeatureNeck, MultiScaleMaskDecoder, PromptEncoder
from pixellm_jax.models.projector import VisionProjector, pool_patches
from pixellm_jax.models.token_fusion import TextHiddenFcs, TokenFusion

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ImageFeatures(NamedTuple):
    llm_tokens: jax.Array  # [B, llm_grid^2, H] projected image tokens for the LLM
    llm_mask: jax.Array  # [B, llm_grid^2] bool, False for tokens over padding
    decoder: list[jax.Array]  # L neck outputs [B, grid, grid, C], deep level first
    vision: list[jax.Array]  # the CLIP feature levels [B, grid^2, D] (patch tokens), deep level first


class PixelLMOutput(NamedTuple):
    logits: jax.Array  # [Q, T + n_img - 1, V]
    labels: jax.Array | None  # [Q, T + n_img - 1], spliced (image positions ignored)
    mask_logits: jax.Array  # [Q, M, h_out, w_out] decoder logits (128 x 128 for 448 input)
    seg: SegGather  # which targets exist, per conversation


class PixelLM(nnx.Module):
    """PixelLM built from a `ModelConfig`; every parameter carries logical axis names."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = DTYPES[cfg.dtype]
        v, t, p, h = cfg.vision, cfg.text, cfg.projector, cfg.head
        kw = dict(dtype=dtype, rngs=rngs)
        self.vision_tower = CLIPVisionTower(v, attention=cfg.attention, **kw)
        proj_hidden = p.hidden_mult * t.hidden_size
        self.mm_projector = VisionProjector(v.hidden_size, proj_hidden, t.hidden_size, **kw)
        if p.separate_out_projector:
            self.out_mm_projector = VisionProjector(v.hidden_size, proj_hidden, t.hidden_size, **kw)
        self.llm = LlamaModel(t, cfg.lora if cfg.lora.enabled else None, attention=cfg.attention, **kw)
        self.text_hidden_fcs = TextHiddenFcs(t.hidden_size, h.out_dim, **kw)
        self.token_fusion = TokenFusion(h, **kw)
        self.image_feature_neck = FeatureNeck(t.hidden_size, h.out_dim, **kw)
        self.prompt_encoder = PromptEncoder(h.out_dim, **kw)
        self.mask_decoder = MultiScaleMaskDecoder(h, attention=cfg.attention, **kw)
        self.seg_ids = h.seg_ids(t.vocab_size)

    def encode_images(self, pixels: jax.Array, resized_hw: jax.Array) -> ImageFeatures:
        """CLIP features of padded images [B, S, S, 3] whose content is resized_hw [B, 2] (h', w')."""
        v, p, h = self.cfg.vision, self.cfg.projector, self.cfg.head
        grid = v.grid
        feats = self.vision_tower(pixels, vit_patch_mask(resized_hw, grid, v.patch_size))
        if not v.trainable:  # the pretrained tower is frozen
            feats = [jax.lax.stop_gradient(f) for f in feats]
        llm_tokens = self.mm_projector(pool_patches(feats[0], grid, p.llm_grid))
        llm_mask = llm_token_mask(resized_hw, p.llm_grid, v.image_size)
        out_proj = self.out_mm_projector if p.separate_out_projector else self.mm_projector
        b = pixels.shape[0]
        decoder = [
            self.image_feature_neck(out_proj(f).reshape(b, grid, grid, -1)) for f in feats[: h.scale_num]
        ]
        return ImageFeatures(llm_tokens, llm_mask, decoder, feats)

    def language(
        self,
        images: ImageFeatures,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        conv_image: jax.Array,
        labels: jax.Array | None = None,
        *,
        deterministic: bool = True,
        image_groups: int = 1,
    ) -> tuple[Spliced, LlamaOutput]:
        """Splice each conversation's image tokens at its -200 sentinel and run the LLM.

        `image_groups`: the batch's block count (`grouped_take`); 1 makes no assumption.
        """
        text = self.llm.embed(jnp.maximum(input_ids, 0))
        spliced = splice_image_tokens(
            text, input_ids, attention_mask,
            take_in_groups(images.llm_tokens, conv_image, image_groups),
            take_in_groups(images.llm_mask, conv_image, image_groups),
            labels,
        )
        out = self.llm(input_embeds=spliced.embeds, attention_mask=spliced.attention_mask,
                       deterministic=deterministic)
        return spliced, out

    def seg_embeddings(self, hidden: jax.Array, token_ids: jax.Array) -> tuple[jax.Array, SegGather]:
        """The fused prompt embeddings [Q, M, L, C] of the codebook groups found in `token_ids` [Q, T]."""
        h = self.cfg.head
        seg = gather_seg_states(hidden, token_ids, self.seg_ids, h.seg_token_num, h.scale_num, h.max_targets)
        # text_hidden_fcs acts per position, so applying it after the gather equals the official order.
        return self.token_fusion(self.text_hidden_fcs(seg.states)), seg

    def decode_masks(
        self, images: ImageFeatures, hidden: jax.Array, token_ids: jax.Array, conv_image: jax.Array,
        image_groups: int = 1,
    ) -> tuple[jax.Array, SegGather]:
        """Mask logits [Q, M, h_out, w_out] for the codebook groups found in `token_ids` [Q, T]."""
        prompts, seg = self.seg_embeddings(hidden, token_ids)
        return self.decode_prompts(images, prompts, conv_image, image_groups), seg

    def decode_prompts(
        self, images: ImageFeatures, prompts: jax.Array, conv_image: jax.Array, image_groups: int = 1,
    ) -> jax.Array:
        """Mask logits [Q, M, h_out, w_out] of fused prompts [Q, M, L, C] (from `seg_embeddings`)."""
        q, m = prompts.shape[:2]
        image_index = jnp.repeat(conv_image, m)
        masks = self.mask_decoder(images.decoder, prompts.reshape(q * m, *prompts.shape[2:]), image_index,
                                  self.prompt_encoder, image_groups=image_groups)
        return masks.reshape(q, m, *masks.shape[1:])

    def __call__(
        self,
        pixels: jax.Array,
        resized_hw: jax.Array,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        conv_image: jax.Array,
        labels: jax.Array | None = None,
        *,
        deterministic: bool = True,
        image_groups: int = 1,
    ) -> PixelLMOutput:
        """Teacher-forced forward: text logits and one mask per codebook group in `input_ids`."""
        images = self.encode_images(pixels, resized_hw)
        spliced, out = self.language(images, input_ids, attention_mask, conv_image, labels,
                                     deterministic=deterministic, image_groups=image_groups)
        masks, seg = self.decode_masks(images, out.hidden, spliced.token_ids, conv_image, image_groups)
        return PixelLMOutput(out.logits, spliced.labels, masks, seg)
