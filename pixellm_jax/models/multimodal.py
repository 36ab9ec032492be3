"""Splicing image tokens into the text sequence at the image sentinel (LLaVA's assembly).

Each sample carries exactly one sentinel id (-200) in its token ids; it is replaced by the sample's
image tokens, so the sequence grows by n_image - 1. Image positions take their own key mask (padded
image regions are masked) and ignored labels. Positions are plain `arange`, as in HF LLaMA.
Everything is gathered with index arithmetic, so it jits once per shape and loops over nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pixellm_jax.tokens import IGNORE_INDEX, IMAGE_TOKEN


class Spliced(NamedTuple):
    embeds: jax.Array  # [B, T + n_img - 1, H]
    attention_mask: jax.Array  # [B, T + n_img - 1] bool
    labels: jax.Array | None  # [B, T + n_img - 1] int32, IGNORE_INDEX at image positions
    token_ids: jax.Array  # [B, T + n_img - 1] int32, IMAGE_TOKEN at image positions
    image_start: jax.Array  # [B] int32, index of the first image token


def image_positions(input_ids: jax.Array) -> jax.Array:
    """Index of the image sentinel in each row [B] (the caller guarantees exactly one)."""
    return jnp.argmax(input_ids == IMAGE_TOKEN, axis=1).astype(jnp.int32)


def splice_image_tokens(
    text_embeds: jax.Array,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    image_embeds: jax.Array,
    image_mask: jax.Array,
    labels: jax.Array | None = None,
) -> Spliced:
    """Replace the sentinel of each row by that row's image tokens.

    text_embeds [B, T, H] (the sentinel row's embedding is ignored), input_ids / attention_mask
    [B, T], image_embeds [B, n, H], image_mask [B, n] bool, labels [B, T] or None.
    """
    b, t, _ = text_embeds.shape
    n = image_embeds.shape[1]
    start = image_positions(input_ids)
    j = jnp.arange(t + n - 1)[None, :]  # output positions
    s = start[:, None]
    is_image = (j >= s) & (j < s + n)
    text_idx = jnp.where(j < s, j, j - n + 1)
    text_idx = jnp.clip(text_idx, 0, t - 1)
    img_idx = jnp.clip(j - s, 0, n - 1)

    def take(x, idx):
        return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

    embeds = jnp.where(is_image[..., None], take(image_embeds, img_idx), take(text_embeds, text_idx))
    mask = jnp.where(is_image, take(image_mask.astype(bool), img_idx), take(attention_mask.astype(bool), text_idx))
    ids = jnp.where(is_image, IMAGE_TOKEN, take(input_ids, text_idx)).astype(jnp.int32)
    out_labels = None
    if labels is not None:
        out_labels = jnp.where(is_image, IGNORE_INDEX, take(labels, text_idx)).astype(jnp.int32)
    return Spliced(embeds.astype(text_embeds.dtype), mask, out_labels, ids, start)
