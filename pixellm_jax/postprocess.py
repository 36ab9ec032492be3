"""Mask logits to original image resolution, for a batch of mixed image sizes (reference §1.8.3).

The official `postprocess_masks` resizes each mask bilinearly to S×S (S = 448), crops the un-padded
resized region [:h', :w'], and resizes bilinearly to the original H×W, all with
`align_corners=False` in float32. Here the per-image sizes are data, not shapes: each output row and
column gets its source index pair and weight from the sizes, the results are gathered into a fixed
[n, H_max, W_max] canvas, and a validity mask marks the real pixels. One compilation serves every
mix of sizes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pixellm_jax.models.grouped_take import take_in_groups


def _source_coordinate(scale: jax.Array, dst: jax.Array) -> jax.Array:
    """max(scale·(dst + 0.5) − 0.5, 0) in float32 with a single rounding, exactly.

    torch's CPU and CUDA kernels compile this to a fused multiply-add, and whether XLA contracts it
    depends on the backend; one ulp here moves a weight by ~1e-5 at 1000-pixel sizes. So the value
    is formed exactly in integer limbs (scale = m·2^(e−24), m a 24-bit integer) and rounded once.
    Valid for sizes below 2^14.
    """
    mant, exp = jnp.frexp(scale)
    m = (mant * 2.0**24).astype(jnp.int32)
    c = 2 * dst + 1  # scale·(dst + 0.5) − 0.5 = (m·c − 2^t)·2^(e−25), t = 24 − e
    t = 24 - exp
    p_hi = jnp.where(t >= 12, jnp.left_shift(1, jnp.maximum(t - 12, 0)), 0)
    p_lo = jnp.where(t >= 12, 0, jnp.left_shift(1, jnp.clip(t, 0, 11)))
    hi = (m >> 12) * c - p_hi  # value·2^(25−e) = hi·2^12 + lo
    lo = (m & 0xFFF) * c - p_lo
    hi = hi + (lo >> 12)
    lo = lo & 0xFFF
    top, mid = hi >> 12, ((hi & 0xFFF) << 12) + lo  # = top·2^24 + mid, with 0 <= mid < 2^24
    total = top.astype(jnp.float32) * 2.0**24 + mid.astype(jnp.float32)  # the one rounding
    return jnp.maximum(jnp.ldexp(total, exp - 25), 0.0)


def _source_taps(out_len: int, in_size: jax.Array, out_size: jax.Array):
    """torch `upsample_bilinear2d` (align_corners=False) taps along one axis, for sizes given as data.

    in_size, out_size: [n] (sizes of the source and target axis per sample). Returns the lower and
    upper source indices and the upper weight, each [n, out_len]. Rows past out_size are clamped
    (and later masked out).
    """
    in_size = in_size.astype(jnp.int32)
    scale = in_size.astype(jnp.float32) / out_size.astype(jnp.float32)
    dst = jnp.arange(out_len, dtype=jnp.int32)
    src = _source_coordinate(scale[:, None], dst[None, :])
    lo = jnp.minimum(jnp.floor(src).astype(jnp.int32), in_size[:, None] - 1)
    lam = jnp.clip(src - lo.astype(jnp.float32), 0.0, 1.0)
    hi = jnp.where(lo < in_size[:, None] - 1, lo + 1, lo)
    return lo, hi, lam


def _resize_axis(x: jax.Array, axis: int, taps) -> jax.Array:
    """Linear interpolation of x [n, ...] along `axis` with per-sample taps [n, out_len]."""
    lo, hi, lam = taps
    shape = [lo.shape[0]] + [1] * (x.ndim - 1)
    shape[axis] = lo.shape[1]

    def take(idx):
        return jnp.take_along_axis(x, idx.reshape(shape), axis=axis)

    lam = lam.reshape(shape)
    return take(lo) * (1.0 - lam) + take(hi) * lam


def postprocess_masks(
    logits: jax.Array,
    resized_hw: jax.Array,
    original_hw: jax.Array,
    out_hw: tuple[int, int],
    image_size: int = 448,
) -> tuple[jax.Array, jax.Array]:
    """Mask logits [n, h, w] -> (logits [n, H_max, W_max] float32, valid [n, H_max, W_max] bool).

    resized_hw [n, 2]: (h', w') of the image after the longest-side resize to image_size (before
    padding); original_hw [n, 2]: the original (H, W), at most out_hw = (H_max, W_max). Pixels outside
    a mask's H×W are 0 and not valid. The binary mask is `logits > 0` (the official code casts back
    to bf16 first, which never changes a sign).
    """
    n, h, w = logits.shape
    h_max, w_max = out_hw
    x = logits.astype(jnp.float32)
    full = jnp.full((n,), image_size, jnp.int32)
    x = _resize_axis(x, 1, _source_taps(image_size, jnp.full((n,), h, jnp.int32), full))
    x = _resize_axis(x, 2, _source_taps(image_size, jnp.full((n,), w, jnp.int32), full))
    resized_hw = jnp.asarray(resized_hw, jnp.int32)
    original_hw = jnp.asarray(original_hw, jnp.int32)
    # The crop [:h', :w'] is implicit: the second resize reads only source indices below h', w'.
    x = _resize_axis(x, 1, _source_taps(h_max, resized_hw[:, 0], original_hw[:, 0]))
    x = _resize_axis(x, 2, _source_taps(w_max, resized_hw[:, 1], original_hw[:, 1]))
    rows = jnp.arange(h_max)[None, :, None] < original_hw[:, 0, None, None]
    cols = jnp.arange(w_max)[None, None, :] < original_hw[:, 1, None, None]
    valid = rows & cols
    return jnp.where(valid, x, 0.0), valid


def target_masks(
    mask_logits: jax.Array,
    resized_hw: jax.Array,
    original_hw: jax.Array,
    conv_image: jax.Array,
    out_hw: tuple[int, int],
    image_size: int = 448,
    image_groups: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """`postprocess_masks` of decoder logits [Q, M, h, w], each target at its conversation's image size.

    resized_hw / original_hw [images, 2] are per image, conv_image [Q] the image of each conversation
    (within blocks when `image_groups` > 1, see `models.grouped_take`). Returns (logits, valid), both
    [Q, M, H_max, W_max].
    """
    q, m = mask_logits.shape[:2]
    image = jnp.repeat(conv_image, m)
    logits, valid = postprocess_masks(
        mask_logits.reshape(q * m, *mask_logits.shape[2:]), take_in_groups(resized_hw, image, image_groups),
        take_in_groups(original_hw, image, image_groups), out_hw, image_size,
    )
    return logits.reshape(q, m, *out_hw), valid.reshape(q, m, *out_hw)
