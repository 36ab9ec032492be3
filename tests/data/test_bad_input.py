"""Every kind of bad input gives BadSample (one record) or DatasetFileError naming the file (a whole file)."""

import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

from pixellm_jax.data import semseg
from pixellm_jax.data.conversation import LegacyTokenizer
from pixellm_jax.data.dataset_io import (
    DatasetFileError,
    decode_segmentation,
    load_image,
    read_json,
    read_plain_pickle,
    resolve_in_root,
)
from pixellm_jax.data.muse import MuseSource
from pixellm_jax.data.pipeline import InputPipeline, PipelineConfig
from pixellm_jax.data.refer import ReferSource
from pixellm_jax.data.sample import BadSample, Conversation, Sample, Source, bad_sample_category
from pixellm_jax.data.tfds_source import decode_image_bytes
from pixellm_jax.data.vqa import VqaSource
from pixellm_jax.eval.batches import BatchShape, eval_batches
from pixellm_jax.tokens import add_codebook_tokens
from tests.tiny_tokenizer import build_tiny_tokenizer

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


# --- image modes and sizes ------------------------------------------------------------------------------


def _grey16(h=H, w=W):
    """Random 16-bit greyscale pixels covering the whole range (0 and 65535 included)."""
    a = np.random.default_rng(1).integers(0, 65536, (h, w)).astype(np.uint16)
    a[0, 0], a[0, 1] = 0, 65535
    return a


def test_16_bit_png_matches_its_8_bit_version(tmp_path):
    """A 16-bit PNG ("I;16") is scaled by 255/65535, not clipped to white, by files and stored bytes alike."""
    grey = _grey16()
    Image.fromarray(grey).save(tmp_path / "deep.png")
    eight = np.round(grey / 257).astype(np.uint8)
    Image.fromarray(eight).save(tmp_path / "flat.png")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode == "I;16"
    expected = load_image(tmp_path / "flat.png", "s")
    for image in (load_image(tmp_path / "deep.png", "s"), decode_image_bytes((tmp_path / "deep.png").read_bytes(), "s")):
        assert image.shape == (H, W, 3) and image.dtype == np.uint8
        assert np.abs(image.astype(int) - expected).max() <= 1
        assert image[0, 0].tolist() == [0, 0, 0] and image[0, 1].tolist() == [255, 255, 255]


def test_16_bit_image_through_a_source(tmp_path):
    src = write_refer(tmp_path)
    grey = _grey16()
    Image.fromarray(grey).save(tmp_path / "images/mscoco/images/train2014/a.jpg", format="PNG")
    image = src.get(0, RNG).image
    assert np.abs(image[..., 0].astype(int) - grey / 257).max() <= 0.5 + 1e-9


@pytest.mark.parametrize(
    "name, data, scale",
    [
        ("I within 16 bits", _grey16().astype(np.int32), 255 / 65535),
        ("I beyond 16 bits", _grey16().astype(np.int32) * 30000, 255 / (2**31 - 1)),
        ("F within [0, 1]", _grey16().astype(np.float32) / 65535, 255.0),
        ("F beyond 1", _grey16().astype(np.float32) / 257, 1.0),
    ],
)
def test_deep_modes_are_scaled_by_their_range(tmp_path, name, data, scale):
    Image.fromarray(data).save(tmp_path / "x.tif")
    with Image.open(tmp_path / "x.tif") as im:
        assert im.mode == name[0]
    image = load_image(tmp_path / "x.tif", "s")
    assert image.shape == (H, W, 3) and (image == image[..., :1]).all()
    assert np.abs(image[..., 0] - np.clip(data * scale, 0, 255)).max() <= 0.5 + 1e-3


@pytest.mark.parametrize("mode, options", [("1", {}), ("L", {}), ("LA", {}), ("P", {}), ("P", {"transparency": 0}),
                                           ("RGBA", {}), ("CMYK", {})])
def test_other_modes_convert_as_pil_does(tmp_path, mode, options):
    """Palettes applied, alpha dropped, CMYK and 1-bit converted."""
    rgb = Image.fromarray(np.random.default_rng(2).integers(0, 256, (H, W, 3), dtype=np.uint8))
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    rgb.convert(mode).save(path, **options)
    with Image.open(path) as im:
        expected = np.asarray(im.convert("RGB"))
    assert np.array_equal(load_image(path, "s"), expected)


class Shapes(Source):
    """One sample per image shape, each with one target covering the image's first row."""

    name = "shapes"

    def __init__(self, shapes):
        self.shapes = shapes

    def __len__(self):
        return len(self.shapes)

    def get(self, index, rng):
        h, w = self.shapes[index]
        masks = np.zeros((1, h, w), bool)
        masks[:, :1] = True
        turns = [("<image>\nWhere is the line?", "It is [SEG].")]
        return Sample(f"shapes:{h}x{w}", self.name, np.full((h, w, 3), 90, np.uint8), [Conversation(turns, masks)])


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    hf = AutoTokenizer.from_pretrained(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")))
    add_codebook_tokens(hf, 3, 2)
    hf.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)
    return LegacyTokenizer.from_transformers(hf, 3, 2)


# 1x300 and 300x1 resize to a 1-pixel side at 56 (the short side would round to 0); 0x40 is empty.
DEGENERATE = [(1, 300), (0, 40), (300, 1), (12, 16)]


def test_degenerate_image_sizes_in_training(tok):
    cfg = PipelineConfig(images_per_batch=4, conversations_per_batch=4, max_targets=3, token_buckets=[257],
                         image_size=56, mask_size=72, n_image_tokens=4, model_max_length=260, seed=0,
                         read_threads=1, num_epochs=1, drop_remainder=False)
    pipe = InputPipeline([Shapes(DEGENERATE)], tok, cfg, process_index=0, process_count=1)
    (batch,) = list(iter(pipe))
    assert pipe.stats.bad_samples == 1 and pipe.stats.as_metrics()["dropped/bad_image"] == 1
    kept = {tuple(hw): tuple(r) for hw, r, valid in zip(batch["original_hw"], batch["resized_hw"], batch["image_valid"])
            if valid}
    assert kept == {(1, 300): (1, 56), (300, 1): (56, 1), (12, 16): (42, 56)}
    assert batch["mask_valid"].sum() == 3 and batch["masks"].sum() > 0


def test_degenerate_image_sizes_in_evaluation(tok):
    skipped = []
    shape = BatchShape(images=8, rows=8, image_size=56, token_buckets=(257,))
    batches = list(eval_batches(Shapes(DEGENERATE), tok, "teacher_forced", shape, skipped=skipped))
    assert len(skipped) == 1 and skipped[0][0] == "shapes:0x40"
    assert bad_sample_category(skipped[0][1]) == "bad_image"
    (batch,) = batches
    assert [item.sample_id for item in batch.items] == ["shapes:1x300", "shapes:300x1", "shapes:12x16"]
    assert batch.arrays["resized_hw"][:3].tolist() == [[1, 56], [56, 1], [42, 56]]


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


@pytest.mark.parametrize(
    "segmentation",
    [
        [[1, 1, 5, 1, 9, 1]],  # collinear
        [[2, 2, 2, 2, 2, 2, 2, 2]],  # one point
        [[3.1, 3.1, 3.3, 3.1, 3.3, 3.3]],  # between pixel centres
        [[3.1, 3.1, 3.3, 3.1, 3.3, 3.3], [1, 1, 5, 1, 9, 1]],
    ],
)
def test_polygon_of_zero_pixels_is_refused(segmentation):
    with pytest.raises(BadSample, match="degenerate polygon: zero area") as e:
        decode_segmentation(segmentation, H, W, "s")
    assert e.value.category == "bad_polygon"
    # a degenerate part of a target that has pixels is harmless
    square = [[1, 1, 5, 1, 5, 5, 1, 5]]
    np.testing.assert_array_equal(decode_segmentation(segmentation + square, H, W, "s"),
                                  decode_segmentation(square, H, W, "s"))


@pytest.mark.parametrize("segmentation", [[], {"size": [H, W], "counts": [H * W]}, [{"size": [H, W], "counts": [H * W]}]])
def test_explicitly_empty_segmentation_is_an_empty_mask(segmentation):
    """An empty list (officially: no target) and an all-zero RLE (how prepared data stores one)."""
    mask = decode_segmentation(segmentation, H, W, "s")
    assert mask.shape == (H, W) and not mask.any()


def test_degenerate_polygon_through_a_source(tmp_path):
    src = write_refer(tmp_path, segmentation=[[1, 1, 5, 5, 9, 9]])
    with pytest.raises(BadSample, match="degenerate polygon") as e:
        src.get(0, RNG)
    assert e.value.sample_id == "refcoco:a.jpg" and e.value.category == "bad_polygon"


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


def test_symlink_out_of_the_root_is_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    write_jpeg(outside / "a.jpg")
    (root / "sub").mkdir(parents=True)
    (root / "link.jpg").symlink_to(outside / "a.jpg")
    (root / "sub" / "up").symlink_to(outside)
    for name in ("link.jpg", "sub/up/a.jpg"):
        with pytest.raises(BadSample, match="escapes the dataset root") as e:
            resolve_in_root(root, name, "s")
        assert e.value.category == "path_escapes_root"


def test_symlinks_within_the_root_are_followed(tmp_path):
    real = tmp_path / "real"
    write_jpeg(real / "train/a.jpg")
    (real / "b.jpg").symlink_to(real / "train/a.jpg")
    (tmp_path / "root").symlink_to(real)  # the dataset directory itself may be a link
    root = tmp_path / "root"
    assert resolve_in_root(root, "b.jpg", "s") == root / "b.jpg"
    assert resolve_in_root(root, "train/a.jpg", "s") == root / "train/a.jpg"


def test_symlink_out_of_the_root_through_a_source(tmp_path):
    write_jpeg(tmp_path / "secret.jpg")
    src = write_refer(tmp_path / "r")
    image = tmp_path / "r/images/mscoco/images/train2014/a.jpg"
    image.unlink()
    image.symlink_to(tmp_path / "secret.jpg")
    with pytest.raises(BadSample, match="escapes the dataset root") as e:
        src.get(0, RNG)
    assert e.value.category == "path_escapes_root"


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
