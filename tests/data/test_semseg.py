"""Semantic and part segmentation sources on tiny fixtures in each dataset's released layout."""

import json

import numpy as np
import pytest
from PIL import Image

from pixellm_jax.data import semseg
from pixellm_jax.data.dataset_io import DatasetFileError
from pixellm_jax.data.sample import SEG_PLACEHOLDER, BadSample

H, W = 20, 30


def write_image(path, h=H, w=W):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def write_label(path, label, mode="L"):
    """A single-channel label PNG: grey-level ("L", ADE20K, COCO-Stuff) or palette ("P", Mapillary)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.frombytes(mode, (label.shape[1], label.shape[0]), label.astype(np.uint8).tobytes())
    if mode == "P":
        img.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    img.save(path)


def label_with(values):
    """A label map split into vertical bands, one per value."""
    label = np.zeros((H, W), np.uint8)
    for i, v in enumerate(values):
        label[:, i * W // len(values) : (i + 1) * W // len(values)] = v
    return label


def targets(sample):
    """{class name: mask} over all conversations, names read back from the one-target questions."""
    out = {}
    for conv in sample.conversations:
        (q, a), = conv.turns
        assert a.count(SEG_PLACEHOLDER) == conv.masks.shape[0] == 1
        out[q] = conv.masks[0]
    return out


def one_per_question(**kw):
    return dict(num_classes_per_sample=9, num_classes_per_question=1, **kw)


def test_class_tables():
    assert len(semseg.ADE20K_CLASSES) == 150 and semseg.ADE20K_CLASSES[4] == "tree"
    assert len(semseg.COCO_STUFF_CLASSES) == 182 and semseg.COCO_STUFF_CLASSES[156] == "sky"
    assert sum("-" in c for c in semseg.COCO_STUFF_CLASSES) == 28


def test_ade20k(tmp_path):
    write_image(tmp_path / "ade20k/images/training/ADE_train_00000001.jpg")
    label = label_with([0, 1, 5])  # ignored, wall, tree
    write_label(tmp_path / "ade20k/annotations/training/ADE_train_00000001.png", label)
    src = semseg.Ade20kSource(tmp_path, **one_per_question())
    sample = src.get(0, np.random.default_rng(0))
    assert sample.sample_id == "ade20k:ADE_train_00000001.jpg"
    got = targets(sample)
    assert len(got) == 2
    for q, m in got.items():
        v = 1 if " wall " in q else 5
        assert (" tree " in q) == (v == 5)
        np.testing.assert_array_equal(m, label == v)


def test_ade20k_only_ignored_pixels(tmp_path):
    write_image(tmp_path / "ade20k/images/training/x.jpg")
    write_label(tmp_path / "ade20k/annotations/training/x.png", np.zeros((H, W)))
    with pytest.raises(BadSample, match="no labelled class"):
        semseg.Ade20kSource(tmp_path).get(0, np.random.default_rng(0))


def test_cocostuff_ignores_dashed_classes(tmp_path):
    write_image(tmp_path / "coco/train2017/000000000009.jpg")
    label = label_with([0, 95, 255, 156])  # person, building-other (ignored), unlabeled, sky
    write_label(tmp_path / "cocostuff/train2017/000000000009.png", label)
    sample = semseg.CocoStuffSource(tmp_path, **one_per_question()).get(0, np.random.default_rng(1))
    got = targets(sample)
    assert len(got) == 2
    for q, m in got.items():
        v = 0 if " person " in q else 156
        np.testing.assert_array_equal(m, label == v)
    assert not any("building" in q for q in got)


def test_mapillary(tmp_path):
    root = tmp_path / "mapillary"
    root.mkdir()
    (root / "config_v2.0.json").write_text(json.dumps({"labels": [{"readable": "Bird"}, {"readable": "Road"}]}))
    write_image(root / "training/images/m1.jpg")
    label = label_with([1, 1, 0])
    write_label(root / "training/v2.0/labels/m1.png", label, mode="P")
    src = semseg.MapillarySource(tmp_path, num_classes_per_sample=1, num_classes_per_question=3)
    (conv,) = src.get(0, np.random.default_rng(0)).conversations
    assert conv.masks.shape[0] == 2
    order = sorted(["bird", "road"], key=conv.turns[0][0].index)
    np.testing.assert_array_equal(conv.masks, np.stack([label == (0 if n == "bird" else 1) for n in order]))


def write_parts(path, categories, image_file, h=H, w=W):
    anns = [
        {"id": 1, "image_id": 5, "category_id": categories[0]["id"], "segmentation": [[2, 2, 10, 2, 10, 8, 2, 8]]},
        {"id": 2, "image_id": 5, "category_id": categories[1]["id"], "segmentation": [[12, 4, 20, 4, 20, 16, 12, 16]]},
    ]
    data = {
        "images": [{"id": 5, "file_name": image_file, "height": h, "width": w}, {"id": 6, "file_name": "none.jpg", "height": h, "width": w}],
        "annotations": anns,
        "categories": categories,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def part_masks():
    a, b = np.zeros((H, W), bool), np.zeros((H, W), bool)
    a[2:8, 2:10] = True
    b[4:16, 12:20] = True
    return a, b


def test_paco_lvis(tmp_path):
    cats = [{"id": 1, "name": "mug_(drinking_container)"}, {"id": 2, "name": "mug_(drinking_container):handle"}]
    write_parts(tmp_path / "vlpart/paco/annotations/paco_lvis_v1_train.json", cats, "train2017/000000000005.jpg")
    write_image(tmp_path / "coco/train2017/000000000005.jpg")
    src = semseg.PacoLvisSource(tmp_path, **one_per_question())
    assert len(src) == 1  # the image without annotations is left out
    names_seen = set()
    for seed in range(8):
        got = targets(src.get(0, np.random.default_rng(seed)))
        mug, handle = part_masks()
        for q, m in got.items():
            if "handle" in q:
                assert "mug handle" in q or "the handle of the mug" in q
                names_seen.add("mug handle" in q)
                np.testing.assert_array_equal(m, handle)
            else:
                assert "segment the mug " in q or " mug " in q
                np.testing.assert_array_equal(m, mug)
    assert names_seen == {True, False}


def test_pascal_part(tmp_path):
    cats = [{"id": 3, "name": "dog:head"}, {"id": 4, "name": "dog:leg"}]
    root = tmp_path / "vlpart/pascal_part"
    write_parts(root / "train.json", cats, "2008_000005.jpg")
    write_image(root / "VOCdevkit/VOC2010/JPEGImages/2008_000005.jpg")
    sample = semseg.PascalPartSource(tmp_path, **one_per_question()).get(0, np.random.default_rng(0))
    head, leg = part_masks()
    for q, m in targets(sample).items():
        np.testing.assert_array_equal(m, head if "head" in q else leg)


def test_semseg_sources_factory(tmp_path):
    with pytest.raises(ValueError, match="unknown"):
        semseg.semseg_sources(tmp_path, ["ade21k"])
    with pytest.raises(DatasetFileError, match="empty dataset"):
        semseg.semseg_sources(tmp_path, ["ade20k"])
