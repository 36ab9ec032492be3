"""Image and mask transforms: the official preprocessing, and masks batched into a fixed canvas.

Images (reference §2.1): resize the longest side to `image_size` with PIL bilinear (antialiased
when shrinking, as torchvision's resize of a PIL image; computed as Pillow 9.4.0 does by
`resize.pil_bilinear_resize`, not by the installed Pillow), new size (int(h·s + 0.5), int(w·s + 0.5))
with s = image_size / max(h, w); normalise (`official`: ImageNet mean/std on the 0–255 scale, which
is what PixelLM uses; `clip`: CLIP's mean/std after scaling to 0–1); then zero-pad bottom and right
to image_size² *after* normalisation. `resized_hw` (h', w') drives the ViT and LLM key masks
(`models.clip.vit_patch_mask` / `llm_token_mask`) and the mask post-processing crop.

Masks. The official loss compares each predicted mask with its ground truth at the image's original
resolution (H, W), which differs per image, so it cannot be jitted with fixed shapes. Here every GT
mask is put on a fixed `mask_size`² canvas, top-left aligned, at resolution `mask_hw`:
  * an image whose longest side is at most mask_size keeps its original resolution (mask_hw = (H, W));
  * a larger one is shrunk with nearest-neighbour sampling (pixel centres) to
    (int(H·s + 0.5), int(W·s + 0.5)), s = mask_size / max(H, W).
The model's logits are post-processed to `mask_hw` instead of (H, W) (`postprocess_masks` with
original_hw = mask_hw, out_hw = (mask_size, mask_size)), and the loss runs over the valid region
[:h, :w] of each mask (`pixel_valid`). How that relates to the official loss: BCE is a per-mask mean
over pixels and dice a ratio of per-mask sums, so both are resolution-independent up to resampling;
for images no larger than mask_size the loss is exactly the official one, and for larger images it
is the same quantity evaluated on a uniformly subsampled pixel grid. With mask_size = image_size
(the default) a large image's canvas resolution equals its resized resolution (h', w'), the
resolution at which the model's logits live before the final bilinear upsampling to (H, W); so the
prediction loses nothing, only the GT is sampled at that grid. Evaluation is unaffected: it
post-processes to the true `original_hw`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import numpy as np

from pixellm_jax.data.resize import pil_bilinear_resize

# ImageNet constants on 0-255 (SAM's pixel_mean / pixel_std), used by PixelLM for the CLIP input.
OFFICIAL_MEAN = (123.675, 116.28, 103.53)
OFFICIAL_STD = (58.395, 57.12, 57.375)
# OpenAI CLIP constants on 0-1 (CLIPImageProcessor image_mean / image_std).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Normalization = Literal["official", "clip"]


def longest_side_shape(hw: tuple[int, int], size: int) -> tuple[int, int]:
    """(int(h·s + 0.5), int(w·s + 0.5)) with s = size / max(h, w) (SAM's ResizeLongestSide), each at least 1.

    The clamp only changes images thinner than 1 : 2·size, whose short side would round to 0 pixels
    (the official code fails on them); a 1-pixel row or column is what such an image resizes to.
    """
    h, w = int(hw[0]), int(hw[1])
    scale = size * 1.0 / max(h, w)
    return max(int(h * scale + 0.5), 1), max(int(w * scale + 0.5), 1)


def resize_longest_side(image: np.ndarray, size: int) -> np.ndarray:
    """[H, W, 3] uint8 -> [h', w', 3] uint8, bilinear to `longest_side_shape`.

    The pixels of Pillow 9.4.0's bilinear resize (the official pin), whatever Pillow is installed
    (`resize.pil_bilinear_resize`; newer Pillow orders the two passes differently for some sizes).
    """
    h, w = longest_side_shape(image.shape[:2], size)
    if (h, w) == image.shape[:2]:
        return image
    return pil_bilinear_resize(image, (h, w))


@functools.lru_cache(maxsize=None)
def _lookup_table(mode: Normalization) -> np.ndarray:
    """[3, 256] float32: the normalised value of every uint8 level per channel (float32 arithmetic)."""
    v = np.arange(256, dtype=np.float32)[:, None]
    if mode == "official":
        table = (v - np.float32(OFFICIAL_MEAN)) / np.float32(OFFICIAL_STD)
    elif mode == "clip":
        table = (v * np.float32(1 / 255) - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)
    else:
        raise ValueError(f"unknown normalization {mode!r} (expected 'official' or 'clip')")
    return np.ascontiguousarray(table.T)


def normalize(image: np.ndarray, mode: Normalization, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 [..., 3] -> float32 normalised per `mode` (into `out` when given).

    Read from a per-level table: the same float32 values as computing (x − mean) / std per pixel,
    at a fraction of the cost.
    """
    table = _lookup_table(mode)
    out = np.empty(image.shape, np.float32) if out is None else out
    for c in range(3):
        np.take(table[c], image[..., c], out=out[..., c])
    return out


@dataclass
class PreparedImage:
    pixels: np.ndarray  # [S, S, 3] float32, normalised, zero-padded
    resized_hw: tuple[int, int]  # (h', w') before padding
    original_hw: tuple[int, int]  # (H, W)


def check_image_shape(image: np.ndarray) -> None:
    """Raise ValueError unless `image` is [H, W, 3] with H, W >= 1 (an empty image cannot be resized)."""
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"image must be [H, W, 3] with H, W >= 1 pixels, got shape {image.shape}")


def preprocess_image(image: np.ndarray, image_size: int, mode: Normalization = "official") -> PreparedImage:
    """Official CLIP-branch preprocessing of one [H, W, 3] uint8 RGB image (zero padding after normalising).

    An empty image raises ValueError (`check_image_shape`).
    """
    check_image_shape(image)
    resized = resize_longest_side(image, image_size)
    h, w = resized.shape[:2]
    pixels = np.zeros((image_size, image_size, 3), np.float32)
    normalize(resized, mode, out=pixels[:h, :w])
    return PreparedImage(pixels, (h, w), tuple(image.shape[:2]))


def mask_shape(original_hw: tuple[int, int], mask_size: int) -> tuple[int, int]:
    """The resolution a GT mask of an (H, W) image has on a mask_size canvas (see module doc)."""
    h, w = int(original_hw[0]), int(original_hw[1])
    if max(h, w) <= mask_size:
        return h, w
    return longest_side_shape((h, w), mask_size)


def _nearest_indices(src: int, dst: int) -> np.ndarray:
    """Source index of each destination pixel centre: floor((j + 0.5) · src / dst) (PIL NEAREST)."""
    return np.minimum(((np.arange(dst) + 0.5) * (src / dst)).astype(np.int64), src - 1)


def masks_to_canvas(masks: np.ndarray, mask_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """[k, H, W] bool -> ([k, mask_size, mask_size] bool, mask_hw), top-left aligned, zero outside."""
    k, h, w = masks.shape
    mh, mw = mask_shape((h, w), mask_size)
    if (mh, mw) != (h, w):
        masks = masks[:, _nearest_indices(h, mh)][:, :, _nearest_indices(w, mw)]
    canvas = np.zeros((k, mask_size, mask_size), bool)
    canvas[:, :mh, :mw] = masks
    return canvas, (mh, mw)
