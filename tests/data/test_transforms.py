"""Image preprocessing (resize rule, PIL bilinear, normalisation constants, padding) and mask canvas."""

import numpy as np
import pytest
from PIL import Image

from pixellm_jax.data.sample import bad_sample_category
from pixellm_jax.data.transforms import (
    check_image_shape,
    longest_side_shape,
    mask_shape,
    masks_to_canvas,
    normalize,
    preprocess_image,
    resize_longest_side,
)


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_longest_side_rounding_is_int_x_plus_half():
    # 5 * (448 / 896) = 2.5: int(2.5 + 0.5) = 3, where round() would give 2 (banker's) and int() 2.
    assert longest_side_shape((5, 896), 448) == (3, 448)
    # 300 * 448 / 449 = 299.33 -> 299; 7 * 448 / 10 = 313.6 -> 314.
    assert longest_side_shape((300, 449), 448) == (299, 448)
    assert longest_side_shape((10, 7), 448) == (448, 314)
    assert longest_side_shape((640, 480), 448) == (448, 336)
    assert longest_side_shape((448, 448), 448) == (448, 448)
    # Upscaling uses the same rule.
    assert longest_side_shape((30, 45), 448) == (299, 448)  # 30 * 9.955... = 298.67


@pytest.mark.parametrize("hw", [(5, 896), (37, 20), (480, 640), (100, 100)])
def test_resize_is_pil_bilinear(hw):
    img = _image(*hw)
    out = resize_longest_side(img, 448)
    h, w = longest_side_shape(hw, 448)
    ref = np.asarray(Image.fromarray(img).resize((w, h), resample=Image.Resampling.BILINEAR))
    assert out.shape == (h, w, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, ref)


def test_normalize_constants():
    px = np.array([[[0, 128, 255]]], np.uint8)
    off = normalize(px, "official")
    np.testing.assert_allclose(
        off[0, 0], [(0 - 123.675) / 58.395, (128 - 116.28) / 57.12, (255 - 103.53) / 57.375], rtol=1e-6)
    clip = normalize(px, "clip")
    np.testing.assert_allclose(
        clip[0, 0],
        [(0 / 255 - 0.48145466) / 0.26862954, (128 / 255 - 0.4578275) / 0.26130258,
         (255 / 255 - 0.40821073) / 0.27577711],
        rtol=1e-6,
    )
    assert off.dtype == clip.dtype == np.float32
    # The table lookup gives exactly the per-pixel float32 formula.
    img = _image(33, 17)
    x = img.astype(np.float32)
    np.testing.assert_array_equal(normalize(img, "official"),
                                  (x - np.float32([123.675, 116.28, 103.53])) / np.float32([58.395, 57.12, 57.375]))
    np.testing.assert_array_equal(
        normalize(img, "clip"),
        (x * np.float32(1 / 255) - np.float32([0.48145466, 0.4578275, 0.40821073]))
        / np.float32([0.26862954, 0.26130258, 0.27577711]))
    with pytest.raises(ValueError, match="normalization"):
        normalize(px, "imagenet")


def test_preprocess_pads_after_normalisation():
    img = _image(30, 45)
    out = preprocess_image(img, 56, "official")
    assert out.original_hw == (30, 45)
    assert out.resized_hw == longest_side_shape((30, 45), 56) == (37, 56)
    assert out.pixels.shape == (56, 56, 3) and out.pixels.dtype == np.float32
    h, w = out.resized_hw
    np.testing.assert_array_equal(out.pixels[h:], 0.0)  # padding is 0 after normalisation, not -mean/std
    expected = normalize(resize_longest_side(img, 56), "official")
    np.testing.assert_array_equal(out.pixels[:h, :w], expected)
    # A tall image pads on the right.
    tall = preprocess_image(_image(60, 20, 1), 56, "clip")
    h, w = tall.resized_hw
    assert (h, w) == (56, 19) and np.all(tall.pixels[:, w:] == 0) and np.any(tall.pixels[:, w - 1] != 0)


def test_thin_images_keep_a_one_pixel_side():
    # 1 * 448 / 1000 = 0.448 rounds to 0: clamped to 1, where the official resize would fail.
    assert longest_side_shape((1, 1000), 448) == (1, 448)
    assert longest_side_shape((1000, 1), 448) == (448, 1)
    assert longest_side_shape((1, 1), 448) == (448, 448)
    assert longest_side_shape((1, 40), 448) == (11, 448)  # not thin enough to need it
    thin = preprocess_image(_image(1, 1000), 56)
    assert thin.resized_hw == (1, 56) and thin.original_hw == (1, 1000)
    assert np.any(thin.pixels[0, :56] != 0) and not thin.pixels[1:].any()
    masks = np.ones((2, 1000, 1), bool)
    canvas, hw = masks_to_canvas(masks, 64)
    assert hw == mask_shape((1000, 1), 64) == (64, 1) and canvas[:, :64, :1].all() and canvas.sum() == 2 * 64


@pytest.mark.parametrize("shape", [(0, 40, 3), (40, 0, 3), (0, 0, 3), (4, 4), (4, 4, 4)])
def test_empty_or_misshapen_images_are_refused(shape):
    image = np.zeros(shape, np.uint8)
    with pytest.raises(ValueError, match="image must be") as e:
        check_image_shape(image)
    assert bad_sample_category(str(e.value)) == "bad_image"
    with pytest.raises(ValueError, match="image must be"):
        preprocess_image(image, 56)


def test_masks_keep_resolution_when_they_fit():
    masks = np.random.default_rng(0).random((2, 30, 50)) > 0.5
    canvas, hw = masks_to_canvas(masks, 64)
    assert hw == (30, 50) and canvas.shape == (2, 64, 64)
    np.testing.assert_array_equal(canvas[:, :30, :50], masks)
    assert not canvas[:, 30:].any() and not canvas[:, :, 50:].any()


@pytest.mark.parametrize("hw", [(100, 70), (65, 200), (128, 128)])
def test_masks_shrink_nearest_like_pil(hw):
    masks = np.random.default_rng(1).random((3,) + hw) > 0.5
    canvas, (mh, mw) = masks_to_canvas(masks, 64)
    assert (mh, mw) == mask_shape(hw, 64) == longest_side_shape(hw, 64)
    for k in range(3):
        ref = np.asarray(Image.fromarray(masks[k].astype(np.uint8) * 255).resize((mw, mh), Image.Resampling.NEAREST))
        np.testing.assert_array_equal(canvas[k, :mh, :mw], ref > 0)
    assert not canvas[:, mh:].any() and not canvas[:, :, mw:].any()


def test_empty_mask_stack():
    canvas, hw = masks_to_canvas(np.zeros((0, 90, 40), bool), 64)
    assert canvas.shape == (0, 64, 64) and hw == (64, 28)
