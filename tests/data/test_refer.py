"""REFER sources read a tiny refCOCO/refCLEF fixture written in the released on-disk layout."""

import json
import pickle

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pixellm_jax.data.refer import ReferSource
from pixellm_jax.data.sample import SEG_PLACEHOLDER

H, W = 24, 32


def rect(x0, y0, x1, y1):
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def polygon(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def rle(mask):
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": r["size"], "counts": r["counts"].decode()}


MASKS = {
    10: rect(2, 3, 7, 9),  # polygon
    11: rect(10, 0, 20, 5) | rect(25, 15, 30, 20),  # two polygons
    12: rect(1, 12, 16, 22),  # compressed RLE
    13: np.zeros((H, W), bool),  # empty segmentation
}
SEGMENTATIONS = {
    10: polygon(2, 3, 7, 9),
    11: polygon(10, 0, 20, 5) + polygon(25, 15, 30, 20),
    12: rle(MASKS[12]),
    13: [],
}


def write_refer(root, dataset="refcoco", split_by="unc", image_dir="images/mscoco/images/train2014", extra_sents=0):
    img_dir = root / image_dir
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b.jpg"):
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(img_dir / name)
    images = [
        {"id": 1, "file_name": "a.jpg", "height": H, "width": W},
        {"id": 2, "file_name": "b.jpg", "height": H, "width": W},
    ]
    anns = [
        {"id": k, "image_id": 1 if k < 13 else 2, "category_id": 1, "segmentation": s} for k, s in SEGMENTATIONS.items()
    ]
    refs = [
        {"ref_id": 0, "ann_id": 10, "image_id": 1, "split": "train", "category_id": 1,
         "sentences": [{"sent": "Left Cup", "sent_id": 0}, {"sent": "small cup", "sent_id": 1}]},
        {"ref_id": 1, "ann_id": 11, "image_id": 1, "split": "train", "category_id": 1,
         "sentences": [{"sent": "two boxes", "sent_id": 2}]},
        {"ref_id": 2, "ann_id": 12, "image_id": 1, "split": "val", "category_id": 1,
         "sentences": [{"sent": " Big Rug ", "sent_id": 3}]
         + [{"sent": f"rug {i}", "sent_id": 10 + i} for i in range(extra_sents)]},
        {"ref_id": 3, "ann_id": 13, "image_id": 2, "split": "testA", "category_id": 1,
         "sentences": [{"sent": "nothing", "sent_id": 4}]},
    ]  # fmt: skip
    (root / dataset).mkdir(parents=True, exist_ok=True)
    with open(root / dataset / f"refs({split_by}).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    with open(root / dataset / "instances.json", "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}, f)
    return root


def test_train_one_target_per_question(tmp_path):
    src = ReferSource(write_refer(tmp_path), "refcoco", num_classes_per_sample=3, num_classes_per_question=1)
    assert len(src) == 1 and src.name == "refcoco"
    sample = src.get(0, np.random.default_rng(0))
    assert sample.sample_id == "refcoco:a.jpg" and sample.image.shape == (H, W, 3)
    expected = {"left cup": MASKS[10], "small cup": MASKS[10], "two boxes": MASKS[11]}
    seen = set()
    for conv in sample.conversations:
        (q, a), = conv.turns
        (text,) = [t for t in expected if t in q]
        seen.add(text)
        assert a.count(SEG_PLACEHOLDER) == 1
        np.testing.assert_array_equal(conv.masks[0], expected[text])
    assert seen == set(expected)


def test_train_groups_keep_mask_order(tmp_path):
    src = ReferSource(write_refer(tmp_path), "refcoco", num_classes_per_sample=1, num_classes_per_question=3)
    for seed in range(5):
        (conv,) = src.get(0, np.random.default_rng(seed)).conversations
        q = conv.turns[0][0]
        order = sorted(["left cup", "small cup", "two boxes"], key=q.index)
        expected = {"left cup": MASKS[10], "small cup": MASKS[10], "two boxes": MASKS[11]}
        np.testing.assert_array_equal(conv.masks, np.stack([expected[t] for t in order]))
        assert conv.turns[0][1].count(SEG_PLACEHOLDER) == 3


def test_train_is_deterministic(tmp_path):
    src = ReferSource(write_refer(tmp_path), "refcoco")
    a, b = (src.get(0, np.random.default_rng(3)) for _ in range(2))
    assert [c.turns for c in a.conversations] == [c.turns for c in b.conversations]


def test_val_single(tmp_path):
    src = ReferSource(write_refer(tmp_path), "refcoco", split="val", mode="val")
    (conv,) = src.get(0, np.random.default_rng(0)).conversations
    assert conv.turns == [("<image>\n What is big rug in this image? Please output segmentation mask.", "[SEG].")]
    np.testing.assert_array_equal(conv.masks[0], MASKS[12])


def test_val_multi_groups(tmp_path):
    src = ReferSource(write_refer(tmp_path, extra_sents=6), "refcoco", split="val", mode="val_multi")
    convs = src.get(0, np.random.default_rng(0)).conversations
    assert [c.masks.shape[0] for c in convs] == [6, 1]
    assert convs[0].turns[0] == (
        "<image>\n What is big rug, rug 0, rug 1, rug 2, rug 3 and rug 4 in this image? Please output segmentation mask.",
        "[SEG], [SEG], [SEG], [SEG], [SEG] and [SEG].",
    )
    assert convs[1].turns[0][1] == "[SEG]"
    assert all((m == MASKS[12]).all() for c in convs for m in c.masks)


def test_test_split_and_empty_mask(tmp_path):
    src = ReferSource(write_refer(tmp_path), "refcoco", split="testA", mode="val")
    sample = src.get(0, np.random.default_rng(0))
    assert sample.sample_id == "refcoco:b.jpg"
    assert not sample.conversations[0].masks.any()


def test_refclef_and_umd_layouts(tmp_path):
    write_refer(tmp_path, dataset="refclef", image_dir="images/saiapr_tc-12")
    assert len(ReferSource(tmp_path, "refclef")) == 1
    write_refer(tmp_path, dataset="refcocog", split_by="umd")
    assert ReferSource(tmp_path, "refcocog").get(0, np.random.default_rng(0)).dataset == "refcocog"
    with pytest.raises(ValueError, match="mode"):
        ReferSource(tmp_path, "refcocog", mode="test")
