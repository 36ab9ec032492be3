"""A training run's overlays: each target tinted and numbered in its palette colour with its ground truth
outlined in the same colour, per-target IoU in index.json, and an index.html showing them together."""

import json

import numpy as np
from PIL import Image

from pixellm_jax.data.transforms import OFFICIAL_MEAN, OFFICIAL_STD
from pixellm_jax.overlay import PALETTE
from pixellm_jax.train.overlays import AnswerOverlay, write_answer_overlays, write_overlays


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


def test_answer_overlays_colour_ground_truths_by_their_matched_prediction(tmp_path):
    h = w = 16
    gt = np.zeros((3, h, w), bool)
    gt[0, 1:5, 1:5] = True
    gt[1, 9:15, 9:15] = True
    gt[2, 1:5, 10:14] = True  # no prediction matches it
    preds = np.zeros((2, h, w), bool)
    preds[0, 9:15, 9:15] = True  # the answer's first target is ground truth 1
    preds[1, 1:5, 1:3] = True  # its second is half of ground truth 0
    pairs = [{"pred": 0, "gt": 1, "iou": 1.0}, {"pred": 1, "gt": 0, "iou": 0.5}, {"pred": None, "gt": 2, "iou": 0.0}]
    item = AnswerOverlay(np.zeros((h, w, 3), np.uint8), preds, gt, "Segment the squares.",
                         "Sure, [1] and [2].", "Sure, [1], [2] and [3].", pairs)
    written = write_answer_overlays(tmp_path, [item, item], count=1, scale=4)
    assert [p.name for p in written] == ["overlay_00.png"]
    right = np.asarray(Image.open(written[0]))[:, (w + 2) * 4:]
    assert tuple(right[1 * 4, 3 * 4]) == PALETTE[1]  # ground truth 0's outline: prediction 2's colour
    assert tuple(right[9 * 4, 12 * 4]) == PALETTE[0]  # ground truth 1's: prediction 1's
    assert tuple(right[1 * 4, 12 * 4]) == PALETTE[2]  # the missed one: a colour of its own
    index = json.loads((tmp_path / "index.json").read_text())
    assert index[0]["text"] == "Q: Segment the squares.\nA: Sure, [1] and [2].\nReference: Sure, [1], [2] and [3]."
    np.testing.assert_allclose(index[0]["iou"], [1.0, 0.5, 0.0])
    page = (tmp_path / "index.html").read_text()
    assert "target 1: IoU 1.000" in page and "target 2: IoU 0.500" in page
    assert "missed ground truth 1: IoU 0.000" in page and f"rgb{PALETTE[2]}" in page
