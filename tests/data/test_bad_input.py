"""Every kind of bad input gives BadSample (one record) or DatasetFileError naming the file (a whole file)."""

import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from pixellm_jax.data import semseg
from pixellm_jax.data.dataset_io import DatasetFileError, decode_segmentation, read_json, read_plain_pickle, resolve_in_root
from pixellm_jax.data.muse import MuseSource
from pixellm_jax.data.refer import ReferSource
from pixellm_jax.data.sample import BadSample
from pixellm_jax.data.vqa import VqaSource

H, W = 12, 16
RNG = np.random.default_rng(0)


def write_jpeg(path, h=H, w=W):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(path)


def write_refer(root, segmentation=None, file_name="a.jpg", h=H):
    write_jpeg(root / "images/mscoco/images/train2014/a.jpg")
    refs = [{"ref_id": 0, "ann_id": 1, "image_id": 1, "split": "train", "sentences": [{"sent": "the cup"}]}]
    (root / "refcoco").mkdir(parents=True, exist_ok=True)
    with open(root / "refcoco/refs(unc).p", "wb") as f:
        pickle.dump(refs, f)
    seg = segmentation if segmentation is not None else [[1, 1, 5, 1, 5, 5, 1, 5]]
    instances = {
        "images": [{"id": 1, "file_name": file_name, "height": h, "width": W}],
        "annotations": [{"id": 1, "image_id": 1, "segmentation": seg}],
    }
    (root / "refcoco/instances.json").write_text(json.dumps(instances))
    return ReferSource(root, "refcoco")


def write_muse(root, **rec_fields):
    write_jpeg(root / "images/train2014/x.jpg")
    inst = {"category_name": "cup", "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]]}
    rec = {"file_name": "x.jpg", "height": H, "width": W, "ann_list": [inst], "questions": ["q?"], "answers": [[inst]]}
    rec.update(rec_fields)
    (root / "muse.json").write_text(json.dumps([rec]))
    return MuseSource(root / "muse.json", root / "images")


def write_vqa(root, image="v.jpg"):
    write_jpeg(root / "coco/v.jpg")
    rec = {"id": "v", "image": image, "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello"}]}
    (root / "llava.json").write_text(json.dumps([rec]))
    return VqaSource(root / "llava.json", root / "coco")


def write_ade(root):
    write_jpeg(root / "ade20k/images/training/d.jpg")
    label = np.zeros((H, W), np.uint8)
    label[2:6, 2:6] = 3
    (root / "ade20k/annotations/training").mkdir(parents=True)
    Image.fromarray(label).save(root / "ade20k/annotations/training/d.png")
    return semseg.Ade20kSource(root)


# --- missing and corrupt images ---------------------------------------------------------------------------

IMAGES = {
    "refer": (write_refer, "images/mscoco/images/train2014/a.jpg", "refcoco:a.jpg"),
    "muse": (write_muse, "images/train2014/x.jpg", "muse:x.jpg"),
    "vqa": (write_vqa, "coco/v.jpg", "vqa:v"),
    "ade20k": (write_ade, "ade20k/images/training/d.jpg", "ade20k:d.jpg"),
}


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_missing_image(tmp_path, kind):
    build, image, sample_id = IMAGES[kind]
    src = build(tmp_path)
    src.get(0, RNG)  # the intact fixture works
    (tmp_path / image).unlink()
    with pytest.raises(BadSample, match="image file not found") as e:
        src.get(0, RNG)
    assert e.value.sample_id == sample_id and image in e.value.reason


@pytest.mark.parametrize("kind", sorted(IMAGES))
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image(tmp_path, kind, damage):
    build, image, sample_id = IMAGES[kind]
    src = build(tmp_path)
    data = (tmp_path / image).read_bytes()
    (tmp_path / image).write_bytes(b"not an image at all" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(BadSample, match="cannot decode image") as e:
        src.get(0, RNG)
    assert e.value.sample_id == sample_id


def test_image_size_differs_from_annotation(tmp_path):
    src = write_refer(tmp_path, h=H + 1)
    with pytest.raises(BadSample, match="annotation says"):
        src.get(0, RNG)


def test_label_map_with_colour_channels(tmp_path):
    src = write_ade(tmp_path)
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "ade20k/annotations/training/d.png")
    with pytest.raises(BadSample, match="expected one channel"):
        src.get(0, RNG)


# --- polygons and RLE --------------------------------------------------------------------------------------

MALFORMED = {
    "odd length": [[1, 1, 5, 1, 5]],
    "too few points": [[1, 1, 5, 5]],
    "strings": [["1", "1", "5", "1", "5", "5"]],
    "nan": [[1, 1, 5, float("nan"), 5, 5]],
    "not a list": [7],
    "wrong type": "polygon",
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_polygon(name):
    with pytest.raises(BadSample, match="malformed"):
        decode_segmentation(MALFORMED[name], H, W, "s")


@pytest.mark.parametrize("poly", [[[1, 1, 30, 1, 30, 5, 1, 5]], [[-5, 1, 5, 1, 5, 5, 1, 5]], [[1, 1, 5, 1, 5, 40, 1, 5]]])
def test_out_of_bounds_polygon(poly):
    with pytest.raises(BadSample, match="outside"):
        decode_segmentation(poly, H, W, "s")


def test_polygon_on_the_border_is_accepted():
    m = decode_segmentation([[0, 0, W, 0, W, H, 0, H]], H, W, "s")
    assert m.all()


@pytest.mark.parametrize(
    "rle",
    [
        {"size": [H, W], "counts": "\x7f\x7f"},  # characters outside the encoding
        {"size": [H, W], "counts": "a"},  # truncated value (continuation bit set)
        {"size": [H, W], "counts": [5, 7]},  # runs do not cover the image
        {"size": [H, W], "counts": [-3, H * W + 3]},  # negative run
        {"size": [H + 1, W], "counts": [H * W + W]},  # size differs from the image
        {"size": [H, W], "counts": 3.5},
    ],
)
def test_malformed_rle(rle):
    with pytest.raises(BadSample, match="RLE"):
        decode_segmentation(rle, H, W, "s")


def test_bad_polygon_through_a_source(tmp_path):
    src = write_refer(tmp_path, segmentation=[[1, 1, 50, 1, 50, 5, 1, 5]])
    with pytest.raises(BadSample, match="outside") as e:
        src.get(0, RNG)
    assert e.value.sample_id == "refcoco:a.jpg"


# --- {seg} count ------------------------------------------------------------------------------------------


def test_seg_count_mismatch(tmp_path):
    src = write_muse(tmp_path, text_answers=["{seg} and {seg}"])
    with pytest.raises(BadSample, match="muse:x.jpg: all 1 questions skipped"):
        src.get(0, RNG)
    assert src.skipped_questions == 1


# --- paths escaping the dataset root ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../a.jpg", "/etc/passwd", "x/../../a.jpg", "..", "", None, "a\x00.jpg"])
def test_path_escaping_root(tmp_path, name):
    with pytest.raises(BadSample):
        resolve_in_root(tmp_path, name, "s")


def test_paths_inside_root_are_kept(tmp_path):
    assert resolve_in_root(tmp_path, "x/../a.jpg", "s") == tmp_path / "a.jpg"
    assert resolve_in_root(tmp_path, "train2017/b.jpg", "s") == tmp_path / "train2017/b.jpg"


def test_escaping_paths_through_sources(tmp_path):
    write_jpeg(tmp_path / "images/mscoco/images/a.jpg")  # a real file just outside the image dir
    with pytest.raises(BadSample, match="escapes the dataset root"):
        write_refer(tmp_path / "r", file_name="../a.jpg").get(0, RNG)
    with pytest.raises(BadSample, match="escapes"):
        write_vqa(tmp_path / "v", image="../../images/mscoco/images/a.jpg").get(0, RNG)
    with pytest.raises(BadSample, match="escapes"):
        write_muse(tmp_path / "m", file_name="/etc/hostname").get(0, RNG)
    src = write_muse(tmp_path / "u")
    src._records[0] = {k: v for k, v in src._records[0].items() if k != "file_name"} | {"coco_url": "http://x/val2017/.."}
    with pytest.raises(BadSample, match="escapes"):
        src.get(0, RNG)


# --- empty datasets and malformed files ----------------------------------------------------------------------


def test_empty_datasets(tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DatasetFileError, match="empty.json: no records"):
        MuseSource(tmp_path / "empty.json", tmp_path)
    with pytest.raises(DatasetFileError, match="empty.json: no records"):
        VqaSource(tmp_path / "empty.json", tmp_path)
    with pytest.raises(DatasetFileError, match="ade20k/images/training: no images found"):
        semseg.Ade20kSource(tmp_path)
    write_refer(tmp_path)
    with pytest.raises(DatasetFileError, match=r"refs\(unc\).p: no refs in split 'val'"):
        ReferSource(tmp_path, "refcoco", split="val")
    parts = tmp_path / "vlpart/pascal_part/train.json"
    parts.parent.mkdir(parents=True)
    parts.write_text(json.dumps({"images": [{"id": 1}], "annotations": [], "categories": []}))
    with pytest.raises(DatasetFileError, match="train.json: no annotated images"):
        semseg.PascalPartSource(tmp_path)


def test_malformed_json_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"questions": ["a"],\n "answers": [}]')
    for build in (lambda: MuseSource(bad, tmp_path), lambda: VqaSource(bad, tmp_path), lambda: read_json(bad)):
        with pytest.raises(DatasetFileError, match=r"bad.json: malformed JSON at line 2"):
            build()
    with pytest.raises(DatasetFileError, match="missing.json: file not found"):
        read_json(tmp_path / "missing.json")
    (tmp_path / "obj.json").write_text('{"a": 1}')
    with pytest.raises(DatasetFileError, match="obj.json: expected a list"):
        MuseSource(tmp_path / "obj.json", tmp_path)


def test_malformed_refer_files(tmp_path):
    write_refer(tmp_path)
    (tmp_path / "refcoco/instances.json").write_text("{")
    with pytest.raises(DatasetFileError, match="instances.json: malformed JSON"):
        ReferSource(tmp_path, "refcoco")
    write_refer(tmp_path)
    with open(tmp_path / "refcoco/refs(unc).p", "wb") as f:
        pickle.dump({"not": "a list"}, f)
    with pytest.raises(DatasetFileError, match=r"refs\(unc\).p: expected a list of refs"):
        ReferSource(tmp_path, "refcoco")
    (tmp_path / "refcoco/refs(unc).p").write_bytes(pickle.dumps([{"a": 1}])[:-5])
    with pytest.raises(DatasetFileError, match="malformed pickle"):
        ReferSource(tmp_path, "refcoco")


def test_malformed_category_file(tmp_path):
    path = tmp_path / "vlpart/pascal_part/train.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a:b:c"}]}))
    with pytest.raises(DatasetFileError, match="train.json: malformed COCO annotation file"):
        semseg.PascalPartSource(tmp_path)


# --- malicious pickles --------------------------------------------------------------------------------------


class RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class OpensFile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("payload", [RunsCommand, OpensFile])
def test_malicious_pickle_is_refused(tmp_path, protocol, payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 0, "x": payload(marker)}], protocol=protocol))
    with pytest.raises(DatasetFileError, match=r"refs\(unc\).p: refused or malformed pickle: global .* is not allowed"):
        read_plain_pickle(path)
    assert not marker.exists()


def test_malicious_refs_file_through_source(tmp_path):
    write_refer(tmp_path)
    marker = tmp_path / "pwned"
    (tmp_path / "refcoco/refs(unc).p").write_bytes(pickle.dumps([RunsCommand(marker)], protocol=2))
    with pytest.raises(DatasetFileError, match="not allowed"):
        ReferSource(tmp_path, "refcoco")
    assert not marker.exists()


def test_plain_pickle_data_is_read(tmp_path):
    data = [{"ref_id": 1, "sentences": [{"sent": "café", "tokens": ["café"]}], "tags": {1, 2}, "box": (1.5, None, True)}]
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        path = tmp_path / f"p{protocol}.p"
        path.write_bytes(pickle.dumps(data, protocol=protocol))
        assert read_plain_pickle(path) == data
