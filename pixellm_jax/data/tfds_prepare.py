"""`pixellm prepare-data`: a raw dataset → a TFDS ArrayRecord dataset of raw records, once.

The records (format in tfds_source.py) keep what a raw source reads from disk — image file bytes,
masks as COCO RLE, texts and ids — so training and evaluation do random access into a few large
files instead of opening thousands of images and parsing annotation files, and still compose their
samples per call, as the raw sources do. One TFDS config per dataset
(`pixellm_records/refcoco_unc`, `.../refcocoplus_unc`, `.../refcocog_umd`, `.../refclef_unc`,
`.../muse`, `.../synthetic`), one TFDS split per dataset split, records in the raw source's order.

Each record is checked when written by composing a sample from it, as the reader would; a record the
raw source could never use (missing or corrupt image, malformed annotation, ...) is skipped, logged
and listed in the dataset metadata (`skipped`), or stops the preparation (`on_bad_sample="raise"`).
Preparation needs tensorflow-datasets but not TensorFlow (the record schema is flat on purpose:
TFDS serialises nested sequences with TensorFlow). The dataset is built beside its final place and
moved there when complete; an existing one is replaced only with `overwrite`.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pixellm_jax.data.dataset_io import (
    DatasetFileError,
    decode_segmentation,
    image_size_of,
    read_plain_pickle,
    resolve_in_root,
)
from pixellm_jax.data.muse import MuseSource
from pixellm_jax.data.refer import DEFAULT_SPLIT_BY, ReferSource
from pixellm_jax.data.sample import BadSample
from pixellm_jax.data.synthetic import SyntheticShapes
from pixellm_jax.data.tfds_source import ADAPTERS, BUILDER_NAME, FORMAT_VERSION, Record, encode_mask

try:
    import tensorflow_datasets as tfds
except ImportError as e:  # not a core dependency
    raise ImportError("pixellm prepare-data needs tensorflow-datasets: pip install 'pixellm-jax[data]'") from e

log = logging.getLogger(__name__)

REFER_DATASETS = ("refcoco", "refcoco+", "refcocog", "refclef")
SOURCES = REFER_DATASETS + ("muse", "synthetic")

FEATURES = tfds.features.FeaturesDict({
    "sample_id": tfds.features.Text(),
    "image": tfds.features.Tensor(shape=(), dtype=np.object_),
    "height": tfds.features.Scalar(dtype=np.int32),
    "width": tfds.features.Scalar(dtype=np.int32),
    "masks": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
    "annotation": tfds.features.Text(),
})


def read_image_bytes(path: Path, sample_id: str) -> bytes:
    """An image file's bytes, as released (decoded and checked when the record is checked)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BadSample(sample_id, f"image file not found: {path}") from None
    except OSError as e:
        raise BadSample(sample_id, f"cannot read image {path}: {e}") from None


class RecordWriter:
    """Turns one raw dataset into records. Subclasses set `kind`, `config_name`, `metadata`."""

    kind: str
    config_name: str
    metadata: dict[str, Any]

    def splits(self) -> list[str]:
        """The dataset's splits (prepared when none are asked for)."""
        raise NotImplementedError

    def records(self, split: str) -> Iterator[Callable[[], Record]]:
        """Per raw record, in the raw source's order, a function that builds it or raises BadSample."""
        raise NotImplementedError


class ReferWriter(RecordWriter):
    """REFER (refcoco, refcoco+, refcocog, refclef): one record per image with refs in the split.

    Reads through `ReferSource`'s index (its file checks, split filter and image order), so the
    records are exactly the raw source's samples.
    """

    kind = "refer"

    def __init__(
        self, root: str | Path, dataset: str, split_by: str | None = None, image_dir: str | Path | None = None
    ):
        self.root, self.dataset, self.image_dir = Path(root), dataset, image_dir
        self.split_by = split_by or DEFAULT_SPLIT_BY.get(dataset, "unc")
        self.config_name = f"{dataset.replace('+', 'plus')}_{self.split_by}"
        self.metadata = {"kind": self.kind, "dataset": dataset, "split_by": self.split_by}

    def splits(self) -> list[str]:
        path = self.root / self.dataset / f"refs({self.split_by}).p"
        refs = read_plain_pickle(path)
        if not isinstance(refs, list) or not all(isinstance(r, dict) and "split" in r for r in refs):
            raise DatasetFileError(path, "expected a list of refs with a 'split'")
        return sorted({str(r["split"]) for r in refs})

    def records(self, split: str) -> Iterator[Callable[[], Record]]:
        src = ReferSource(self.root, self.dataset, split, self.split_by, image_dir=self.image_dir)
        for image_id in src._image_ids:
            yield partial(self._record, src, image_id)

    @staticmethod
    def _record(src: ReferSource, image_id: int) -> Record:
        info = src._images.get(image_id)
        if not isinstance(info, dict):
            raise BadSample(f"{src.name}:image_id={image_id}", "image id missing from instances.json")
        sample_id = f"{src.name}:{info.get('file_name')}"
        path = resolve_in_root(src.image_dir, info.get("file_name"), sample_id)
        height, width = image_size_of(info, sample_id)
        image = read_image_bytes(path, sample_id)
        sentences, masks, mask_index = [], [], {}
        for ref in src._img2refs[image_id]:
            for sent in ref["sentences"]:
                if not isinstance(sent, dict) or not isinstance(sent.get("sent"), str):
                    raise BadSample(sample_id, f"ref {ref.get('ref_id')}: sentence without a 'sent' string")
                ann_id = ref["ann_id"]
                if ann_id not in mask_index:
                    ann = src._anns.get(ann_id)
                    if not isinstance(ann, dict) or "segmentation" not in ann:
                        raise BadSample(sample_id, f"annotation {ann_id!r} missing from instances.json")
                    mask_index[ann_id] = len(masks)
                    masks.append(encode_mask(decode_segmentation(ann["segmentation"], height, width, sample_id)))
                sentences.append([sent["sent"], mask_index[ann_id]])
        annotation = {"image_id": image_id, "ann_ids": list(mask_index), "sentences": sentences}
        return Record(sample_id, image, height, width, masks, annotation)


class MuseWriter(RecordWriter):
    """MUSE: `<root>/muse_<split>.json`, one record per image record, images under `image_dir`
    (default `<root>/refer_seg/images/mscoco/images`, as training reads it).

    Every instance mask is decoded here, so a malformed mask of a question the raw source would skip
    (a "{seg}" count mismatch) drops the whole record, where the raw source drops only the question.
    """

    kind = "muse"
    config_name = "muse"

    def __init__(self, root: str | Path, image_dir: str | Path | None = None):
        self.root = Path(root)
        default = self.root / "refer_seg" / "images" / "mscoco" / "images"
        self.image_dir = Path(image_dir) if image_dir is not None else default
        self.metadata = {"kind": self.kind, "dataset": "muse"}

    def splits(self) -> list[str]:
        names = sorted(p.name[len("muse_"):-len(".json")] for p in self.root.glob("muse_*.json"))
        if not names:
            raise DatasetFileError(self.root, "no muse_<split>.json files")
        return names

    def records(self, split: str) -> Iterator[Callable[[], Record]]:
        src = MuseSource(self.root / f"muse_{split}.json", self.image_dir)
        for index in range(len(src)):
            yield partial(self._record, src, index)

    @staticmethod
    def _record(src: MuseSource, index: int) -> Record:
        rec = src._records[index]
        sample_id = f"muse:{index}"
        if not isinstance(rec, dict):
            raise BadSample(sample_id, "record is not an object")
        path = src._image_path(rec, sample_id)
        sample_id = f"muse:{path.name}"
        questions, answers = rec.get("questions"), rec.get("answers")
        if not isinstance(questions, list) or not isinstance(answers, list) or len(questions) != len(answers):
            raise BadSample(sample_id, "needs 'questions' and 'answers' lists of equal length")
        if not isinstance(rec.get("ann_list"), list) or not rec["ann_list"]:
            raise BadSample(sample_id, "empty or missing ann_list")
        height, width = image_size_of(rec, sample_id)
        image = read_image_bytes(path, sample_id)
        masks, stored = [], []
        for qi, instances in enumerate(answers):
            if not isinstance(instances, list) or not all(isinstance(x, dict) for x in instances):
                raise BadSample(sample_id, f"question {qi}: expected a list of instance objects")
            for x in instances:
                masks.append(encode_mask(decode_segmentation(x.get("segmentation"), height, width, sample_id)))
            stored.append([{k: v for k, v in x.items() if k != "segmentation"} for x in instances])
        annotation = {"questions": questions, "answers": stored,
                      "text_answers": rec.get("text_answers", [None] * len(questions))}
        return Record(sample_id, image, height, width, masks, annotation)


class SyntheticWriter(RecordWriter):
    """The synthetic dataset: `num_samples` scenes per split, split k of `splits` drawn with seed + k."""

    kind = "synthetic"
    config_name = "synthetic"

    def __init__(self, splits: Sequence[str], num_samples: int, seed: int):
        self.seeds = {split: seed + k for k, split in enumerate(splits)}
        self.num_samples = num_samples
        self.metadata = {"kind": self.kind, "dataset": "synthetic", "num_samples": num_samples, "seeds": self.seeds}

    def splits(self) -> list[str]:
        return list(self.seeds)

    def records(self, split: str) -> Iterator[Callable[[], Record]]:
        if split not in self.seeds:
            raise ValueError(f"synthetic split {split!r} was not given to the writer (it has {list(self.seeds)})")
        src = SyntheticShapes(num_samples=self.num_samples, seed=self.seeds[split])
        for index in range(len(src)):
            yield partial(self._record, src, index)

    @staticmethod
    def _record(src: SyntheticShapes, index: int) -> Record:
        scene = src.scene(index)
        png = io.BytesIO()
        Image.fromarray(scene.image).save(png, format="PNG")
        height, width = scene.image.shape[:2]
        annotation = {"index": index, "shapes": [dataclasses.asdict(s) for s in scene.shapes]}
        return Record(f"{src.name}:{index}", png.getvalue(), height, width,
                      [encode_mask(m) for m in scene.visible], annotation)


class PixellmRecords(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder of one dataset's records (ArrayRecord files, the raw source's order kept).

    Not registered: readers open the prepared files by name and data_dir, without this class.
    """

    VERSION = tfds.core.Version(FORMAT_VERSION)

    def __init__(self, writer: RecordWriter, splits: Sequence[str], on_bad_sample: str = "skip", **kwargs):
        if on_bad_sample not in ("skip", "raise"):
            raise ValueError(f"on_bad_sample must be skip or raise, got {on_bad_sample!r}")
        self.writer, self.split_names, self.on_bad_sample = writer, list(splits), on_bad_sample
        self.skipped: dict[str, list[str]] = {split: [] for split in self.split_names}
        config = tfds.core.BuilderConfig(name=writer.config_name, description=f"{writer.kind} records")
        super().__init__(config=config, file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        metadata = tfds.core.MetadataDict(self.writer.metadata, skipped=self.skipped)
        description = (f"PixelLM {self.writer.kind} records (raw annotation per image) written by "
                       "`pixellm prepare-data`; read them with pixellm_jax.data.tfds_source.TfdsSource")
        return tfds.core.DatasetInfo(builder=self, description=description, features=FEATURES, disable_shuffling=True,
                                     metadata=metadata)

    def _split_generators(self, dl_manager) -> dict[str, Iterator]:
        return {split: self._generate_examples(split) for split in self.split_names}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        checker = ADAPTERS[self.writer.kind](self.writer.metadata)
        kept = 0
        for index, make in enumerate(self.writer.records(split)):
            try:
                example = make().as_example()
                checker.sample(example, f"{split} record {index}", np.random.default_rng(0))
            except BadSample as e:
                if self.on_bad_sample == "raise":
                    raise
                self.skipped[split].append(f"{e.sample_id}: {e.reason}")
                log.warning("prepare-data %s: skipped %s: %s", split, e.sample_id, e.reason)
                continue
            kept += 1
            yield index, example
        if not kept:
            raise DatasetFileError(f"{self.writer.config_name} split {split}", "no usable records")


@dataclasses.dataclass
class Prepared:
    """What `prepare` wrote: read it with `TfdsSource(name, split, data_dir)`."""

    name: str  # "pixellm_records/<config>"
    data_dir: str
    path: str  # the version directory holding the files
    num_records: dict[str, int]
    skipped: dict[str, list[str]]


def make_writer(
    source: str,
    root: str | Path | None,
    splits: Sequence[str] | None = None,
    split_by: str | None = None,
    image_dir: str | Path | None = None,
    num_samples: int = 10000,
    seed: int = 0,
) -> RecordWriter:
    """The record writer of a source name (one of SOURCES)."""
    if source == "synthetic":
        return SyntheticWriter(splits or ["train"], num_samples, seed)
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r} (known: {', '.join(SOURCES)})")
    if root is None:
        raise ValueError(f"source {source} needs --root, the dataset folder in its released layout")
    if source == "muse":
        return MuseWriter(root, image_dir)
    return ReferWriter(root, source, split_by, image_dir)


def prepare(
    writer: RecordWriter,
    out: str | Path,
    splits: Sequence[str] | None = None,
    on_bad_sample: str = "skip",
    overwrite: bool = False,
) -> Prepared:
    """Writes `writer`'s dataset (all its splits, or `splits`) under the TFDS data_dir `out`."""
    out = Path(out)
    splits = list(splits or writer.splits())
    final = out / BUILDER_NAME / writer.config_name / FORMAT_VERSION
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; pass overwrite (--overwrite) to replace it")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".prepare-{writer.config_name}-", dir=out) as tmp:
        builder = PixellmRecords(writer, splits, on_bad_sample, data_dir=tmp)
        builder.download_and_prepare(
            download_dir=Path(tmp) / "downloads",
            download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP),
        )
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # replaced only now that the new one is complete; removed with tmp
            final.rename(Path(tmp) / "replaced")
        Path(builder.data_dir).rename(final)
        counts = {split: builder.info.splits[split].num_examples for split in splits}
    return Prepared(f"{BUILDER_NAME}/{writer.config_name}", str(out), str(final), counts, builder.skipped)


def prepare_command(args: Any) -> int:
    """`pixellm prepare-data` (arguments in cli.py)."""
    try:
        if len(args.num_samples) != 1:
            raise ValueError(f"--num-samples takes one count here (scenes per split), got {args.num_samples}")
        writer = make_writer(args.source, args.root, args.split, args.split_by, args.image_dir, args.num_samples[0],
                             args.seed)
        result = prepare(writer, args.out, args.split, args.on_bad_sample, args.overwrite)
    except (BadSample, DatasetFileError, FileExistsError, ValueError) as e:
        print(f"pixellm prepare-data: error: {e}", file=sys.stderr)
        return 2
    for split, n in result.num_records.items():
        print(f"{result.name} split {split}: {n} records, {len(result.skipped[split])} skipped")
    print(f"written to {result.path}; read with TfdsSource({result.name!r}, split, data_dir={result.data_dir!r})")
    return 0
