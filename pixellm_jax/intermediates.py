"""Every stage's output of one teacher-forced PixelLM forward, as a named structure.

For parity work against PyTorch and for research probes: the CLIP feature levels, the LLM's image
tokens, the neck outputs the decoder reads, the LLM's last hidden states and logits (image spliced),
the fused `[SEG]` prompt embeddings, the decoder's low-resolution mask logits and the final mask
logits at each image's original size. Image-shaped arrays are NHWC / [.., H, W] (the official code
is NCHW: transpose `decoder_features` by (0, 3, 1, 2) to compare). `forward_intermediates` is pure
and jittable; `pixellm_jax.predictor.Predictor.intermediates` builds its inputs from an image and text.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pixellm_jax.models.pixellm import PixelLM
from pixellm_jax.postprocess import target_masks


class Intermediates(NamedTuple):
    vision_features: list[jax.Array]  # CLIP feature levels [B, grid^2, D_vision], deep level first
    image_tokens: jax.Array  # [B, n_img, H] projected image tokens spliced into the text
    decoder_features: list[jax.Array]  # neck outputs [B, grid, grid, C] per level (NHWC), deep first
    hidden_states: jax.Array  # [Q, T + n_img - 1, H] last LLM hidden states
    logits: jax.Array  # [Q, T + n_img - 1, V]
    token_ids: jax.Array  # [Q, T + n_img - 1] the spliced token ids (image positions -200)
    seg_embeddings: jax.Array  # [Q, M, L, C] fused codebook prompts, one row per target slot
    num_targets: jax.Array  # [Q] complete codebook groups found (targets 0 .. n-1 are valid)
    low_res_masks: jax.Array  # [Q, M, h, w] decoder mask logits (128 x 128 at 448 px input)
    masks: jax.Array  # [Q, M, H_max, W_max] float32 mask logits at the original image size (> 0: inside)


def forward_intermediates(
    model: PixelLM,
    pixels: jax.Array,
    resized_hw: jax.Array,
    original_hw: jax.Array,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    conv_image: jax.Array,
    out_hw: tuple[int, int],
) -> Intermediates:
    """The teacher-forced forward of `PixelLM.__call__`, keeping each stage's output.

    pixels [B, S, S, 3] preprocessed images, resized_hw / original_hw [B, 2], input_ids and
    attention_mask [Q, T] (one -200 image sentinel per row), conv_image [Q]; out_hw = (H_max, W_max)
    bounds the original sizes (pixels beyond a mask's own H x W are 0).
    """
    images = model.encode_images(pixels, resized_hw)
    spliced, out = model.language(images, input_ids, attention_mask, conv_image)
    prompts, seg = model.seg_embeddings(out.hidden, spliced.token_ids)
    low = model.decode_prompts(images, prompts, conv_image)
    masks, _ = target_masks(low, jnp.asarray(resized_hw), jnp.asarray(original_hw), jnp.asarray(conv_image),
                            out_hw, model.cfg.vision.image_size)
    return Intermediates(list(images.vision), images.llm_tokens, list(images.decoder), out.hidden, out.logits,
                         spliced.token_ids, prompts, seg.num_targets, low, masks)
