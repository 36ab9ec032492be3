"""A training run's overlays: each target tinted and numbered in its palette colour with its ground truth
outlined in the same colour, per-target IoU in index.json, and an index.html showing them together."""

import json

import numpy as np
from PIL import Image

from pixellm_jax.data.transforms import OFFICIAL_MEAN, OFFICIAL_STD
from pixellm_jax.overlay import PALETTE
from pixellm_jax.train.validation import write_overlays


class _Tokenizer:
    def decode(self, ids):
        return "Q: segment the squares <&> A: " + " ".join(map(str, ids))


def test_overlays_number_colour_and_score_each_target(tmp_path):
    h = w = 16
    image = np.zeros((h, w, 3), np.uint8)
    pixels = ((image - np.float32(OFFICIAL_MEAN)) / np.float32(OFFICIAL_STD))[None]
    masks = np.zeros((1, 2, h, w), bool)
    masks[0, 0, 2:6, 2:6] = True
    masks[0, 1, 9:15, 9:15] = True
    pred = np.zeros_like(masks)
    pred[0, 0, 2:6, 2:6] = True  # exact
    pred[0, 1, 9:15, 9:12] = True  # half
    local = {"conv_valid": np.array([True]), "conv_image": np.array([0]), "resized_hw": np.array([[h, w]]),
             "pixels": pixels, "mask_hw": np.array([[h, w]]), "mask_valid": np.array([[True, True]]),
             "masks": masks, "input_ids": np.array([[5, 6, -100]]), "attention_mask": np.array([[True, True, False]])}
    written = write_overlays(tmp_path, [(local, pred)], _Tokenizer(), count=3, normalization="official", scale=4)
    assert [p.name for p in written] == ["overlay_00.png"]
    picture = np.asarray(Image.open(written[0]))
    assert picture.shape == (h * 4, (2 * w + 2) * 4, 3)
    right = picture[:, (w + 2) * 4:]
    for k, (y, x) in enumerate(((2 * 4, 4 * 4), (15 * 4 - 1, 12 * 4))):  # on each ground truth's outline
        assert tuple(right[y, x]) == PALETTE[k], k
    tinted = right[10 * 4 + 1, 9 * 4 + 1]  # inside target 2's prediction: half black, half its colour
    np.testing.assert_allclose(tinted, np.asarray(PALETTE[1]) / 2, atol=1)
    index = json.loads((tmp_path / "index.json").read_text())
    np.testing.assert_allclose(index[0]["iou"], [1.0, 0.5])
    page = (tmp_path / "index.html").read_text()
    assert 'src="overlay_00.png"' in page and "segment the squares &lt;&amp;&gt;" in page
    assert "target 1: IoU 1.000" in page and "target 2: IoU 0.500" in page
    assert f"rgb{PALETTE[1]}" in page
