"""MUSE source on a tiny JSON release: image locations, polygon/RLE masks, {seg} answers, skipping."""

import json
import logging

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pixellm_jax.data.muse import MuseSource
from pixellm_jax.data.sample import SEG_PLACEHOLDER, BadSample

H, W = 16, 24


def box(x0, y0, x1, y1):
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


APPLE, PEAR, DOG = box(1, 1, 6, 5), box(8, 2, 14, 9), box(3, 10, 20, 15)


def inst(name, segmentation, rephrased=None):
    d = {"category_id": 1, "category_name": name, "bbox": [0, 0, 1, 1], "segmentation": segmentation}
    if rephrased:
        d["rephrased_name"] = rephrased
    return d


def poly(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def uncompressed_rle(m):
    """COCO uncompressed RLE: column-major run lengths, starting with a (possibly empty) background run."""
    counts, current, run = [], False, 0
    for v in m.flatten(order="F"):
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    return {"size": [H, W], "counts": counts + [run]}


def compressed_rle(m):
    r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": r["size"], "counts": r["counts"].decode()}


def write_muse(root, records):
    for sub, name in (("train2014", "COCO_train2014_000000000001.jpg"), ("val2017", "000000000002.jpg")):
        (root / "images" / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((H, W, 3), 128, np.uint8)).save(root / "images" / sub / name)
    path = root / "muse_train.json"
    path.write_text(json.dumps(records))
    return path


def records():
    apple = inst("apple", poly(1, 1, 6, 5), "the red apple")
    pear = inst("pear", compressed_rle(PEAR))
    dog = inst("dog", uncompressed_rle(DOG))
    return [
        {
            "file_name": "COCO_train2014_000000000001.jpg", "height": H, "width": W,
            "ann_list": [apple, pear, dog],
            "questions": ["Which fruits are ripe?", "What could bark?", "Which one is sour?"],
            "answers": [[apple, pear], [dog], [pear]],
            "text_answers": ["The ripe ones are {seg} and {seg}.", None, "{seg} and {seg} are sour."],
        },
        {
            "coco_url": "http://images.cocodataset.org/val2017/000000000002.jpg", "height": H, "width": W,
            "ann_list": [apple, dog],
            "questions": ["What is there?"],
            "answers": [[apple, dog]],
        },
    ]  # fmt: skip


def test_uncompressed_rle_helper():
    r = mask_utils.frPyObjects(uncompressed_rle(DOG), H, W)
    np.testing.assert_array_equal(mask_utils.decode(r).astype(bool), DOG)


def test_muse_record_with_text_answers(tmp_path, caplog):
    src = MuseSource(write_muse(tmp_path, records()), tmp_path / "images")
    assert len(src) == 2
    with caplog.at_level(logging.WARNING):
        sample = src.get(0, np.random.default_rng(0))
    assert sample.sample_id == "muse:COCO_train2014_000000000001.jpg"
    assert len(sample.conversations) == 2  # the third question has 2 {seg} for 1 instance
    assert src.skipped_questions == 1
    assert "question 2 skipped" in caplog.text and "COCO_train2014_000000000001.jpg" in caplog.text
    first, second = sample.conversations
    q, a = first.turns[0]
    assert q in (
        "<image>\nWhich fruits are ripe? Please respond with segmentation mask.",
        "<image>\nWhich fruits are ripe? Please output segmentation mask.",
    )
    assert a == "The ripe ones are [SEG] and [SEG]."
    np.testing.assert_array_equal(first.masks, np.stack([APPLE, PEAR]))
    assert second.turns[0][1].count(SEG_PLACEHOLDER) == 1 and "dog" in second.turns[0][1]
    np.testing.assert_array_equal(second.masks, DOG[None])


def test_muse_coco_url_and_composed_answer(tmp_path):
    src = MuseSource(write_muse(tmp_path, records()), tmp_path / "images")
    seen = set()
    for seed in range(12):
        (conv,) = src.get(1, np.random.default_rng(seed)).conversations
        a = conv.turns[0][1]
        assert a.count(SEG_PLACEHOLDER) == 2
        seen.add("red apple" in a)
        assert ("the red apple" in a or "apple" in a) and "dog" in a
        np.testing.assert_array_equal(conv.masks, np.stack([APPLE, DOG]))
    assert True in seen


def test_muse_all_questions_skipped(tmp_path):
    rec = records()[0]
    rec["text_answers"] = ["{seg}", "{seg} {seg}", "none"]
    src = MuseSource(write_muse(tmp_path, [rec]), tmp_path / "images")
    with pytest.raises(BadSample, match="all 3 questions skipped"):
        src.get(0, np.random.default_rng(0))
    assert src.skipped_questions == 3


def test_muse_misaligned_lists(tmp_path):
    rec = records()[0]
    rec["answers"] = rec["answers"][:2]
    with pytest.raises(BadSample, match="equal length"):
        MuseSource(write_muse(tmp_path, [rec]), tmp_path / "images").get(0, np.random.default_rng(0))
