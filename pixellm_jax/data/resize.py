"""Bilinear resize of uint8 images, bit-exact with Pillow 9.4.0 (the version the official PixelLM pins).

Why not call Pillow: newer Pillow changed the order of the two separable passes for some sizes.
Pillow 12.2 ran the vertical pass first for images over 100 times taller than wide (PR #9524);
Pillow 13.0 does it far more often (PR #9549, "If height is scaled down significantly more than
width, resize vertically first"). Each pass rounds to uint8, so the order shows in the pixels:
about a fifth of the values differ by one level. In our tests 13.0 runs the vertical pass first
when the height loses more than twice as many pixels as the width (H − h > 2·(W − w), h < H);
a longest-side resize does that for downscaled images about twice as tall as wide or more.
The arithmetic of each pass has not changed, so other sizes still match. This module redoes 9.4's
`ImagingResample` (libImaging/Resample.c) for the bilinear filter in NumPy, so our preprocessing
gives the official pixels whatever Pillow is installed:

  * per axis, in float64 as in C: scale = in/out, filterscale = max(scale, 1), support =
    filterscale, taps [trunc(c − support + 0.5), trunc(c + support + 0.5)) ∩ [0, in) around
    c = (i + 0.5)·scale, weights max(0, 1 − |(j − c + 0.5)·(1/filterscale)|) divided by their sum
    (added up in tap order), then fixed point: trunc(0.5 + w·2²²);
  * the horizontal pass always runs first, then the vertical one; each computes
    (2²¹ + Σ pixel·weight) >> 22 in integers, clipped to 0..255 and stored as uint8;
  * an axis whose size does not change is not resampled at all.

The results were checked against Pillow 9.4.0 (tests/data/test_resize.py, with fixtures from
tests/data/golden/make_resize_golden.py).
"""

from __future__ import annotations

import functools
import math

import numpy as np

_PRECISION_BITS = 32 - 8 - 2  # Resample.c: 8 bits for the result, 2 spare bits for overflow


@functools.lru_cache(maxsize=256)
def _coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """([out, ksize] int64 source index, [out, ksize] int32 fixed-point weight) for one axis.

    Replays `precompute_coeffs` and `normalize_coeffs_8bpc` for the bilinear filter (support 1)
    with the full-image box (0, in_size), keeping the order of the double operations. Taps past
    the end of a window get weight 0 and a valid index.
    """
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    inv = 1.0 / filterscale

    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64) - xmin  # tap count

    taps = np.arange(ksize, dtype=np.int64)
    src = xmin[:, None] + taps[None, :]
    t = np.abs(((src.astype(np.float64) - center[:, None]) + 0.5) * inv)
    weight = np.where(t < 1.0, 1.0 - t, 0.0)
    weight[taps[None, :] >= xmax[:, None]] = 0.0
    total = np.zeros(out_size, np.float64)
    for j in range(ksize):  # in tap order, as the C loop adds them
        total += weight[:, j]
    np.divide(weight, total[:, None], out=weight, where=total[:, None] != 0.0)
    fixed = np.trunc(0.5 + weight * float(1 << _PRECISION_BITS)).astype(np.int32)  # weights are >= 0

    index = np.minimum(src, in_size - 1)
    index.flags.writeable = False
    fixed.flags.writeable = False
    return index, fixed


def _pass(image: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """Resample uint8 `image` along `axis` (0 or 1) to `out_size`, one Pillow 8-bit pass."""
    index, weight = _coefficients(image.shape[axis], out_size)
    shape = list(image.shape)
    shape[axis] = out_size
    acc = np.full(shape, 1 << (_PRECISION_BITS - 1), np.int32)
    # Each tap's weights vary along `axis` only: shape [out, 1, 1] for rows, [1, out, 1] for columns.
    wshape = [1] * image.ndim
    wshape[axis] = out_size
    for j in range(index.shape[1]):
        acc += np.take(image, index[:, j], axis=axis) * weight[:, j].reshape(wshape)
    np.right_shift(acc, _PRECISION_BITS, out=acc)
    return np.clip(acc, 0, 255).astype(np.uint8)


def pil_bilinear_resize(image: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """[H, W] or [H, W, C] uint8 -> [h, w(, C)] uint8, as Pillow 9.4.0 `Image.resize((w, h), BILINEAR)`.

    Antialiased when shrinking (the filter widens with the scale), plain bilinear when enlarging.
    An unchanged size returns a copy. Channels are resampled independently, as Pillow does for
    its L and RGB modes (not RGBA, which Pillow resizes with premultiplied alpha).
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"expected an [H, W] or [H, W, C] uint8 image, got {image.dtype} {image.shape}")
    h, w = int(out_hw[0]), int(out_hw[1])
    if h < 1 or w < 1 or min(image.shape[:2]) < 1:
        raise ValueError(f"cannot resize an image of shape {image.shape} to {(h, w)}")
    out = image
    if w != image.shape[1]:  # horizontal pass first, as Pillow 9.4 always does
        out = _pass(out, w, axis=1)
    if h != image.shape[0]:
        out = _pass(out, h, axis=0)
    return out.copy() if out is image else out
