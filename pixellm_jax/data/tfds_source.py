"""Datasets prepared as TFDS ArrayRecord files, read by random access without TensorFlow.

`pixellm prepare-data` (tfds_prepare.py) writes a source's *raw* annotation once, one record per
image, into `<data_dir>/pixellm_records/<config>/<version>/` (one TFDS config per dataset, one TFDS
split per dataset split). A record holds what the raw source reads from disk, so that `Sample`s are
still composed here, per call, from the `rng` that `get` receives — templates, target choices and
questions are drawn exactly as the raw source draws them:

    sample_id    text    the raw source's sample id ("refcoco:COCO_train2014_000000000009.jpg")
    image        bytes   the image file as released (JPEG/PNG; PNG for generated images)
    height/width int32   the size the annotation declares
    masks        [bytes] COCO compressed-RLE counts of each [height, width] mask
    annotation   text    JSON of the kind's texts and ids (below)

Kinds (dataset metadata `kind`), each with an adapter below; another source plugs in with an adapter
here and a record writer in tfds_prepare.py:
  * refer      {"image_id", "ann_ids" (one per mask), "sentences": [[text, mask index], ...]};
               options as `ReferSource`
               (mode, num_classes_per_sample, num_classes_per_question, questions);
  * muse       {"questions", "answers" (instances without segmentation), "text_answers"}, masks of
               every answer's instances in order; option `questions`;
  * synthetic  {"index", "shapes": [{kind, colour, size, cx, cy, radius}, ...]}, masks = visible
               pixels per shape; options as `SyntheticShapes` (questions_per_image, kind_weights, ...).
The TFDS catalog dataset `ref_coco` (`tfds build ref_coco --file_format=array_record`) is read too,
as kind "ref_coco": its objects' PNG masks and expressions, with the refer options. Its texts are
REFER's `raw` expressions (cased, punctuated), not the normalised `sent` the REFER files give and
PixelLM trained on, and its sample ids name the COCO image id.

Reading goes through TFDS's ArrayRecord data source (`builder.as_data_source`, as `tfds.data_source`),
which imports no TensorFlow; images are decoded with PIL as `dataset_io.load_image` decodes files, so
a prepared dataset gives the raw source's samples exactly.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

from pixellm_jax.data import templates
from pixellm_jax.data.dataset_io import DatasetFileError, build_sample, decode_segmentation, image_to_rgb, stack_masks
from pixellm_jax.data.sample import BadSample, Sample, Source
from pixellm_jax.data.synthetic import Scene, Shape, SyntheticShapes, describe

log = logging.getLogger(__name__)

BUILDER_NAME = "pixellm_records"
FORMAT_VERSION = "1.0.0"
CATALOG_REF_COCO = "ref_coco"


@dataclass
class Record:
    """One prepared record, as written by tfds_prepare and read back here."""

    sample_id: str
    image: bytes
    height: int
    width: int
    masks: list[bytes]
    annotation: dict[str, Any]

    def as_example(self) -> dict[str, Any]:
        """The TFDS example (feature name → value) that stores this record."""
        return {
            "sample_id": self.sample_id,
            "image": self.image,
            "height": self.height,
            "width": self.width,
            "masks": list(self.masks),
            "annotation": json.dumps(self.annotation, ensure_ascii=False),
        }

    @classmethod
    def from_example(cls, example: Mapping[str, Any], where: str) -> "Record":
        """A record from what the data source returns; malformed content raises BadSample."""
        sample_id = _text(example.get("sample_id")) or where
        try:
            annotation = json.loads(_text(example["annotation"]))
            if not isinstance(annotation, dict):
                raise ValueError("annotation is not a JSON object")
            return cls(
                sample_id=sample_id,
                image=bytes(example["image"]),
                height=int(example["height"]),
                width=int(example["width"]),
                masks=[bytes(m) for m in example["masks"]],
                annotation=annotation,
            )
        except (KeyError, TypeError, ValueError) as e:  # JSONDecodeError is a ValueError
            raise BadSample(sample_id, f"malformed record in {where}: {e}") from None

    def decode_image(self) -> np.ndarray:
        """The image as [H, W, 3] uint8 RGB, checked against the declared size."""
        image = decode_image_bytes(self.image, self.sample_id)
        if image.shape[:2] != (self.height, self.width):
            raise BadSample(self.sample_id, f"image is {image.shape[0]}x{image.shape[1]}, record says "
                                            f"{self.height}x{self.width}")
        return image

    def decode_mask(self, i: int) -> np.ndarray:
        """Mask `i` as [H, W] bool."""
        if not 0 <= i < len(self.masks):
            raise BadSample(self.sample_id, f"mask index {i} out of range: the record has {len(self.masks)} masks")
        counts = self.masks[i].decode("ascii", "replace")
        return decode_segmentation({"size": [self.height, self.width], "counts": counts},
                                   self.height, self.width, self.sample_id)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else "" if value is None else str(value)


def encode_mask(mask: np.ndarray) -> bytes:
    """An [H, W] mask as COCO compressed-RLE counts (lossless, what `Record.decode_mask` reads)."""
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]


def decode_image_bytes(data: bytes, sample_id: str) -> np.ndarray:
    """Encoded image bytes as [H, W, 3] uint8 RGB (as `dataset_io.load_image` decodes a file)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return image_to_rgb(img)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadSample(sample_id, f"cannot decode the stored image: {e}") from None


def refer_sample(
    sample_id: str,
    dataset: str,
    image: np.ndarray,
    sentences: Sequence[tuple[str, int]],
    mask_of: Callable[[int], np.ndarray],
    rng: np.random.Generator,
    mode: str,
    num_classes_per_sample: int,
    num_classes_per_question: int,
    questions: Sequence[str],
) -> Sample:
    """A referring Sample from (text, mask key) sentences, composed as `ReferSource.get` composes it."""
    if not sentences:
        raise BadSample(sample_id, "no referring sentences")
    height, width = image.shape[:2]
    conversations = []
    if mode == "train":
        for group in templates.sample_targets(list(sentences), rng, num_classes_per_sample, num_classes_per_question):
            turn = templates.segmentation_turn([t for t, _ in group], rng, questions)
            conversations.append(([turn], stack_masks([mask_of(k) for _, k in group], height, width)))
    else:
        lowered = [(t.strip().lower(), k) for t, k in sentences]
        if mode == "val":
            groups = [[s] for s in lowered]
        else:
            groups = [[lowered[i] for i in r] for r in templates.multi_referring_groups(len(lowered))]
        for group in groups:
            texts = [t for t, _ in group]
            if mode == "val":
                turn = templates.referring_eval_turn(texts[0])
            else:
                turn = templates.multi_referring_eval_turn(texts)
            conversations.append(([turn], stack_masks([mask_of(k) for _, k in group], height, width)))
    return build_sample(sample_id, dataset, image, conversations)


class ReferRecords:
    """Kind "refer": REFER images with their sentences, composed as by `ReferSource`."""

    def __init__(
        self,
        metadata: Mapping[str, Any],
        mode: str = "train",
        num_classes_per_sample: int = 3,
        num_classes_per_question: int = 3,
        questions: Sequence[str] = templates.SHORT_QUESTION_LIST,
    ):
        if mode not in ("train", "val", "val_multi"):
            raise ValueError(f"mode must be train, val or val_multi, got {mode!r}")
        self.name = str(metadata["dataset"])
        self.mode = mode
        self.num_classes_per_sample = num_classes_per_sample
        self.num_classes_per_question = num_classes_per_question
        self.questions = tuple(questions)

    def sample(self, example: Mapping[str, Any], where: str, rng: np.random.Generator) -> Sample:
        record = Record.from_example(example, where)
        sentences = record.annotation.get("sentences")
        if not isinstance(sentences, list) or not all(
            isinstance(s, list) and len(s) == 2 and isinstance(s[0], str) and isinstance(s[1], int) for s in sentences
        ):
            raise BadSample(record.sample_id, f"malformed record in {where}: sentences must be [text, mask index]")
        cache: dict[int, np.ndarray] = {}

        def mask_of(i: int) -> np.ndarray:
            if i not in cache:
                cache[i] = record.decode_mask(i)
            return cache[i]

        return refer_sample(record.sample_id, self.name, record.decode_image(), [tuple(s) for s in sentences],
                            mask_of, rng, self.mode, self.num_classes_per_sample, self.num_classes_per_question,
                            self.questions)


class CatalogRefCocoRecords(ReferRecords):
    """Kind "ref_coco": the TFDS catalog's `ref_coco` examples (image, objects with mask and refexps)."""

    def __init__(self, metadata: Mapping[str, Any], **options):
        super().__init__({"dataset": metadata["config"].split("_")[0].replace("refcocoplus", "refcoco+")}, **options)

    def sample(self, example: Mapping[str, Any], where: str, rng: np.random.Generator) -> Sample:
        sample_id = f"{self.name}:image_id={example.get('image/id')}"
        try:
            objects = example["objects"]
            masks, raws = objects["mask"], objects["refexp"]["raw"]
            sentences = [(_text(text), j) for j, texts in enumerate(raws) for text in texts]
            image = decode_image_bytes(bytes(example["image"]), sample_id)
        except (KeyError, TypeError) as e:
            raise BadSample(sample_id, f"malformed ref_coco example in {where}: {e}") from None

        def mask_of(j: int) -> np.ndarray:
            mask = np.asarray(masks[j])
            mask = mask.any(axis=-1) if mask.ndim == 3 else mask.astype(bool)
            if mask.shape != image.shape[:2]:
                raise BadSample(sample_id, f"object {j}: mask {mask.shape} differs from the image {image.shape[:2]}")
            return mask

        return refer_sample(sample_id, self.name, image, sentences, mask_of, rng, self.mode,
                            self.num_classes_per_sample, self.num_classes_per_question, self.questions)


class MuseRecords:
    """Kind "muse": MUSE images with their questions, composed as by `MuseSource`."""

    name = "muse"

    def __init__(self, metadata: Mapping[str, Any], questions: Sequence[str] = templates.LONG_QUESTION_LIST):
        self.questions = tuple(questions)
        self.skipped_questions = 0

    def sample(self, example: Mapping[str, Any], where: str, rng: np.random.Generator) -> Sample:
        record = Record.from_example(example, where)
        a, sample_id = record.annotation, record.sample_id
        questions, answers, text_answers = a.get("questions"), a.get("answers"), a.get("text_answers")
        if not (isinstance(questions, list) and isinstance(answers, list) and isinstance(text_answers, list)
                and len(questions) == len(answers) == len(text_answers)):
            raise BadSample(sample_id, f"malformed record in {where}: questions, answers and text_answers must be "
                                       "aligned lists")
        image = record.decode_image()
        conversations, offset, dropped = [], 0, []
        for qi, (text, instances, text_answer) in enumerate(zip(questions, answers, text_answers)):
            if not (isinstance(text, str) and isinstance(instances, list)
                    and all(isinstance(x, dict) for x in instances)):
                raise BadSample(sample_id, f"question {qi}: expected a string and a list of instance objects")
            if text_answer is None and not all("category_name" in x for x in instances):
                raise BadSample(sample_id, f"question {qi}: instance without category_name")
            if text_answer is not None and not isinstance(text_answer, str):
                raise BadSample(sample_id, f"question {qi}: text answer is not a string")
            question = templates.muse_question(text, rng, self.questions)
            answer = templates.muse_answer(instances, text_answer, rng)
            start, offset = offset, offset + len(instances)
            if answer is None:
                self.skipped_questions += 1
                log.warning("%s: question %d skipped: %s", sample_id, qi, "no target instances" if text_answer is None
                            else f"text answer has {text_answer.count('{seg}')} {{seg}} for {len(instances)} instances")
                dropped.append("seg_mismatch" if text_answer is not None else "malformed_record")
                continue
            masks = [record.decode_mask(start + i) for i in range(len(instances))]
            conversations.append(([(question, answer)], stack_masks(masks, *image.shape[:2])))
        if offset != len(record.masks):
            raise BadSample(sample_id, f"record has {len(record.masks)} masks for {offset} instances")
        if not conversations:
            raise BadSample(sample_id, f"all {len(questions)} questions skipped")
        sample = build_sample(sample_id, self.name, image, conversations)
        sample.dropped = dropped
        return sample


class _StoredScene(SyntheticShapes):
    """`SyntheticShapes` asking its questions about one stored scene instead of drawing it."""

    def __init__(self, scene: Scene, index: int, **question_options):
        super().__init__(num_samples=index + 1, **question_options)
        self._scene = scene

    def scene(self, index: int) -> Scene:
        return self._scene


class SyntheticRecords:
    """Kind "synthetic": stored scenes of `SyntheticShapes`, questions drawn as it draws them."""

    name = "synthetic"

    def __init__(self, metadata: Mapping[str, Any], **question_options):
        SyntheticShapes(num_samples=1, **question_options)  # refuses bad options now, not per record
        self.question_options = question_options

    def sample(self, example: Mapping[str, Any], where: str, rng: np.random.Generator) -> Sample:
        record = Record.from_example(example, where)
        try:
            index = int(record.annotation["index"])
            shapes = [Shape(**s) for s in record.annotation["shapes"]]
        except (KeyError, TypeError, ValueError) as e:
            raise BadSample(record.sample_id, f"malformed record in {where}: {e}") from None
        if len(shapes) != len(record.masks) or not shapes:
            raise BadSample(record.sample_id, f"record has {len(record.masks)} masks for {len(shapes)} shapes")
        image = record.decode_image()
        visible = np.stack([record.decode_mask(i) for i in range(len(shapes))])
        scene = Scene(image, shapes, visible, describe(shapes))
        return _StoredScene(scene, index, **self.question_options).get(index, rng)


class RecordAdapter(Protocol):
    """Turns the examples of one record kind into Samples; built from the dataset metadata and the raw
    source's sampling options."""

    name: str

    def sample(self, example: Mapping[str, Any], where: str, rng: np.random.Generator) -> Sample: ...


ADAPTERS: dict[str, Callable[..., RecordAdapter]] = {
    "refer": ReferRecords,
    "muse": MuseRecords,
    "synthetic": SyntheticRecords,
    CATALOG_REF_COCO: CatalogRefCocoRecords,
}


class TfdsSource(Source):
    """A TFDS ArrayRecord dataset as a random-access `Source` (TFDS data source, no TensorFlow).

    `name` is "pixellm_records/<config>" as `pixellm prepare-data` prints it (or "ref_coco/<config>"),
    `split` a TFDS split ("train", "val", "testA", ... or a slice such as "train[:1%]"), `options`
    the sampling options of the kind's raw source (e.g. `mode="val"` for REFER evaluation).
    An unreadable record (a corrupt file) raises BadSample naming the dataset directory.
    """

    def __init__(self, name: str, split: str, data_dir: str | Path, **options):
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise ImportError("TfdsSource needs tensorflow-datasets: pip install 'pixellm-jax[data]'") from e
        dataset_dir = Path(data_dir) / name.split(":")[0]
        if not dataset_dir.is_dir():
            raise DatasetFileError(dataset_dir, "no prepared dataset here (write one with `pixellm prepare-data`)")
        try:
            builder = tfds.builder(name, data_dir=str(data_dir))
            info = builder.info
        except Exception as e:  # tfds raises several types for unreadable dataset_info/features files
            raise DatasetFileError(dataset_dir, f"cannot open the prepared dataset: {e}") from None
        if info.name == CATALOG_REF_COCO:
            kind, metadata = CATALOG_REF_COCO, {"config": info.config_name}
            decoders = {"image": tfds.decode.SkipDecoding()}  # decoded with PIL, as files are
        else:
            metadata = dict(info.metadata or {})
            kind, decoders = metadata.get("kind"), None
        if kind not in ADAPTERS:
            raise DatasetFileError(builder.data_dir, f"unknown record kind {kind!r} (known: {sorted(ADAPTERS)})")
        self.where = f"{builder.data_dir} split {split}"
        try:
            self._data = builder.as_data_source(split, decoders=decoders)
        except ValueError as e:  # unknown split
            raise DatasetFileError(builder.data_dir, str(e)) from None
        try:
            self.adapter = ADAPTERS[kind](metadata, **options)
        except KeyError as e:
            raise DatasetFileError(builder.data_dir, f"dataset metadata lacks {e}") from None
        self.kind = kind
        self.name = self.adapter.name

    def __len__(self) -> int:
        return len(self._data)

    def get(self, index: int, rng: np.random.Generator) -> Sample:
        if not 0 <= index < len(self._data):
            raise IndexError(f"record {index} out of range [0, {len(self._data)}) of {self.where}")
        try:
            example = self._data[index]
        except Exception as e:  # array_record/protobuf raise RuntimeError, DecodeError, ... for corrupt bytes
            raise BadSample(f"{self.name}:{index}", f"cannot read record {index} of {self.where}: {e}") from None
        return self.adapter.sample(example, f"{self.where} record {index}", rng)
