"""`pil_bilinear_resize` gives Pillow 9.4.0's bilinear pixels (the official pin), whatever Pillow is installed.

The reference is tests/data/golden/resize_golden.npz, written by Pillow 9.4.0 with
tests/data/golden/make_resize_golden.py (which also makes the inputs used here). Where the
installed Pillow did not change (upscales, single-axis resizes) it must agree with us too, on
inputs the fixture has never seen.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixellm_jax.data.resize import pil_bilinear_resize
from pixellm_jax.data.transforms import longest_side_shape, resize_longest_side

_GOLDEN_DIR = Path(__file__).with_name("golden")
_spec = importlib.util.spec_from_file_location("make_resize_golden", _GOLDEN_DIR / "make_resize_golden.py")
golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden)

CASES = golden.CASES
LONGEST_SIDE_CASES = CASES[:-2]  # the last two are arbitrary (h, w), not longest-side shapes
ids = [golden.key(hw, out_hw, "")[:-1] for hw, out_hw in CASES]


@pytest.fixture(scope="module")
def fixture():
    with np.load(golden.OUT) as data:
        return {k: data[k] for k in data.files}


def _pillow(image, out_hw):
    return np.asarray(Image.fromarray(image).resize(out_hw[::-1], Image.Resampling.BILINEAR))


def _assert_golden(fixture, out, hw, out_hw, kind):
    k = golden.key(hw, out_hw, kind)
    assert out.shape == (*out_hw, 3) and out.dtype == np.uint8
    s = golden.SAMPLE_STRIDE
    sample = fixture[f"{k}/sample"]
    differ = np.count_nonzero(out[::s, ::s] != sample)
    assert differ == 0, f"{k}: {differ} of {sample.size} sampled values differ from Pillow 9.4.0"
    if f"{k}/full" in fixture:
        np.testing.assert_array_equal(out, fixture[f"{k}/full"])
    assert bytes(golden.digest(out)) == bytes(fixture[f"{k}/sha256"]), f"{k}: differs from Pillow 9.4.0"


def test_fixture_comes_from_pillow_9_4(fixture):
    assert str(fixture["pillow_version"]) == "9.4.0"
    assert all(f"{golden.key(hw, o, kind)}/sha256" in fixture for hw, o in CASES for kind in golden.KINDS)


@pytest.mark.parametrize("hw, out_hw", LONGEST_SIDE_CASES, ids=ids[: len(LONGEST_SIDE_CASES)])
def test_cases_are_longest_side_shapes(hw, out_hw):
    assert longest_side_shape(hw, 448) == out_hw


@pytest.mark.parametrize("kind", golden.KINDS)
@pytest.mark.parametrize("hw, out_hw", CASES, ids=ids)
def test_matches_pillow_9_4(fixture, hw, out_hw, kind):
    _assert_golden(fixture, pil_bilinear_resize(golden.make_input(hw, kind), out_hw), hw, out_hw, kind)


@pytest.mark.parametrize("hw, out_hw", LONGEST_SIDE_CASES, ids=ids[: len(LONGEST_SIDE_CASES)])
def test_resize_longest_side_gives_the_official_pixels(fixture, hw, out_hw):
    image = golden.make_input(hw, "noise")
    out = resize_longest_side(image, 448)
    _assert_golden(fixture, out, hw, out_hw, "noise")
    if out_hw == hw:
        assert out is image  # unresized images pass through, as before


def test_tall_downscale_differs_from_newer_pillow_only_in_pass_order():
    # The case. Pillow >= 13 resamples the height first here; each pass rounds to uint8.
    image = golden.make_input((560, 250), "noise")
    ours = pil_bilinear_resize(image, (448, 200))
    vertical_first = pil_bilinear_resize(pil_bilinear_resize(image, (448, 250)), (448, 200))
    assert np.mean(ours != vertical_first) > 0.1  # the order matters, by one level
    assert np.abs(ours.astype(int) - vertical_first).max() == 1
    current = _pillow(image, (448, 200))
    assert np.array_equal(current, ours) or np.array_equal(current, vertical_first)


def _seeded(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "hw, out_hw",
    [
        ((30, 45), (299, 448)),  # longest-side upscales
        ((37, 20), (448, 242)),
        ((1, 40), (11, 448)),
        ((1, 1), (448, 448)),
        ((97, 211), (206, 448)),
        ((2, 3), (5, 7)),
        ((5, 5), (1000, 13)),
        ((250, 560), (250, 448)),  # one axis only: a single pass, no order to change
        ((560, 250), (448, 250)),
        ((1000, 1), (448, 1)),
        ((1, 1000), (1, 448)),
        ((123, 457), (123, 999)),
    ],
)
def test_agrees_with_installed_pillow_where_it_did_not_change(hw, out_hw):
    for seed in range(2):
        image = _seeded(*hw, seed)
        np.testing.assert_array_equal(pil_bilinear_resize(image, out_hw), _pillow(image, out_hw))


def test_channels_are_independent_and_grayscale_works():
    image = _seeded(61, 173, 3)
    out = pil_bilinear_resize(image, (40, 77))
    for c in range(3):
        np.testing.assert_array_equal(pil_bilinear_resize(np.ascontiguousarray(image[..., c]), (40, 77)), out[..., c])
    gray = image[..., 0].copy()  # Pillow mode L
    ref = np.asarray(Image.fromarray(gray).resize((500, 200), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(pil_bilinear_resize(gray, (200, 500)), ref)


def test_same_size_is_a_copy_and_bad_input_is_refused():
    image = _seeded(4, 6, 0)
    same = pil_bilinear_resize(image, (4, 6))
    assert same is not image and np.array_equal(same, image)
    with pytest.raises(ValueError):
        pil_bilinear_resize(image.astype(np.float32), (2, 3))
    with pytest.raises(ValueError):
        pil_bilinear_resize(image, (0, 3))
    with pytest.raises(ValueError):
        pil_bilinear_resize(np.zeros((0, 5, 3), np.uint8), (2, 3))

