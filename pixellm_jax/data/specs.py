"""Datasets named by one spec in training and evaluation: `[NAME=]KIND[:key=value,key=value,...]`.

The same spec is a `data.datasets` / `data.val` entry of a training config and a `pixellm eval
--split` argument. A kind given without the keys it reads takes them from the official `./dataset`
layout under a dataset directory (`train.dataset_dir`, `pixellm eval --dataset-dir`):

  muse       json (muse_train.json / muse_val.json), images (refer_seg/images/mscoco/images: the COCO
             root holding train2014/, train2017/, val2017/)
  refer      root (refer_seg), dataset (refcoco | refcoco+ | refcocog | refclef), split (train; val when
             evaluating), split_by, mode (train; val when evaluating; val_multi), image_dir.
             `refcoco`, `refcoco+`, `refcocog` and `refclef` are `refer` with that dataset.
  refer_seg  the four REFER datasets together (training), with root
  vqa        json (llava_dataset/llava_instruct_150k.json), images (coco/train2017)
  sem_seg    ade20k, cocostuff, pascal_part, paco_lvis and mapillary together, with root (the dataset
             directory) and optional names (e.g. names=ade20k+cocostuff); each is also a kind of its own
  tfds       name (e.g. pixellm_records/muse), split, data_dir: a dataset written by
             `pixellm prepare-data`, plus its record kind's options
  synthetic  the built-in shapes dataset: any `SyntheticShapes` argument (num_samples, seed, ...)

Every kind also takes `limit` (read only the first N records) and `protocol` (teacher_forced |
generate: how an evaluation scores it; referring data default to teacher_forced, the rest to
generate). Values are YAML scalars; relative paths are resolved against the working directory once,
when the spec enters the program (`absolute_spec`). Examples:
`muse:json=data/muse_val.json,images=data/coco`, `refcocog_val=refer:dataset=refcocog,split=val`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import yaml

from pixellm_jax.data.sample import Sample, Source
from pixellm_jax.errors import UserError

Purpose = Literal["train", "eval"]
PROTOCOLS = ("teacher_forced", "generate")
REFER_DATASETS = ("refclef", "refcoco", "refcoco+", "refcocog")
SEMSEG_NAMES = ("ade20k", "cocostuff", "pascal_part", "paco_lvis", "mapillary")
KINDS = ("muse", "refer", "refer_seg", "vqa", "sem_seg", "tfds", "synthetic", *REFER_DATASETS, *SEMSEG_NAMES)
# Keys whose values are file system paths (made absolute when a spec enters the program).
PATH_KEYS = ("json", "images", "root", "image_dir", "data_dir")
# Record kinds of prepared (TFDS) datasets that are scored like `refer`.
REFERRING_RECORDS = ("refer", "ref_coco")


class SpecError(ValueError, UserError):
    """A dataset spec that cannot be parsed or opened; the message names the spec and the key."""


@dataclass
class DatasetSpec:
    """A parsed spec: display name, kind, its options (YAML-parsed), and the generic keys."""

    text: str
    name: str
    kind: str
    options: dict = field(default_factory=dict)
    protocol: str | None = None
    limit: int | None = None


def _parse_options(text: str, spec: str) -> dict:
    options = {}
    for part in filter(None, text.split(",")):
        if "=" not in part:
            raise SpecError(f"dataset {spec!r}: expected key=value, got {part!r}")
        key, value = part.split("=", 1)
        try:
            parsed = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:  # not a YAML scalar (e.g. a path starting with '@' or '['): kept as written
            parsed = None
        options[key.strip()] = value if isinstance(parsed, (dict, list)) or parsed is None else parsed
    return options


def parse_spec(spec: str) -> DatasetSpec:
    """A `DatasetSpec` from its text; unknown kinds and malformed options name the spec."""
    head, _, opts = spec.partition(":")
    name, _, kind = head.rpartition("=")
    kind = kind.strip()
    if kind not in KINDS:
        raise SpecError(f"dataset {spec!r}: unknown kind {kind!r} (known: {', '.join(KINDS)})")
    options = _parse_options(opts, spec)
    protocol = options.pop("protocol", None)
    if protocol is not None and protocol not in PROTOCOLS:
        raise SpecError(f"dataset {spec!r}: protocol must be one of {PROTOCOLS}, got {protocol!r}")
    limit = options.pop("limit", None)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise SpecError(f"dataset {spec!r}: limit must be a positive integer, got {limit!r}")
    return DatasetSpec(spec, name.strip(), kind, options, protocol, limit)


def _is_url(value: str) -> bool:
    return "://" in value


def absolute_spec(spec: str, cwd: str | os.PathLike | None = None) -> str:
    """`spec` with every relative path value (`PATH_KEYS`) made absolute against `cwd` (default: the
    working directory); the rest of the text is kept as written."""
    parse_spec(spec)  # a malformed spec is refused here, at the boundary
    head, sep, opts = spec.partition(":")
    if not sep:
        return spec
    base = Path(cwd) if cwd is not None else Path.cwd()
    parts = []
    for part in filter(None, opts.split(",")):
        key, _, value = part.partition("=")
        value = value.strip()
        if key.strip() in PATH_KEYS and value and not _is_url(value) and not Path(value).is_absolute():
            part = f"{key.strip()}={(base / value).absolute()}"
        parts.append(part)
    return f"{head}:{','.join(parts)}"


@dataclass
class SpecContext:
    """What a spec's defaults depend on: where the official layout is, and what the data is for."""

    dataset_dir: Path = Path("dataset")
    purpose: Purpose = "train"
    seed: int = 0
    max_targets: int = 3
    synthetic_samples: int = 10000
    num_classes_per_sample: int = 3
    num_classes_per_question: int = 3


class FirstRecords(Source):
    """The first `limit` records of a source (a spec's `limit=`)."""

    def __init__(self, source: Source, limit: int):
        self.source, self.limit = source, min(limit, len(source))
        self.name = source.name

    def __len__(self) -> int:
        return self.limit

    def get(self, index: int, rng: np.random.Generator) -> Sample:
        if not 0 <= index < self.limit:
            raise IndexError(f"record {index} out of range [0, {self.limit}) of {self.name}")
        return self.source.get(index, rng)

    def __getattr__(self, item):  # e.g. TfdsSource.kind, MuseSource.skipped_questions
        return getattr(self.__dict__["source"], item)


def _pop_path(options: dict, key: str, default: Path) -> Path:
    return Path(str(options.pop(key))) if key in options else default


def _sources(spec: DatasetSpec, ctx: SpecContext) -> list[Source]:
    kind, o, root = spec.kind, dict(spec.options), ctx.dataset_dir
    evaluating = ctx.purpose == "eval"
    sampling = dict(num_classes_per_sample=ctx.num_classes_per_sample,
                    num_classes_per_question=ctx.num_classes_per_question)
    if kind == "muse":
        from pixellm_jax.data.muse import MuseSource

        json_file = _pop_path(o, "json", root / ("muse_val.json" if evaluating else "muse_train.json"))
        images = _pop_path(o, "images", root / "refer_seg" / "images" / "mscoco" / "images")
        return [MuseSource(json_file, images, **o)]
    if kind in ("refer", *REFER_DATASETS):
        from pixellm_jax.data.refer import ReferSource

        if kind != "refer":
            o.setdefault("dataset", kind)
        o.setdefault("split", "val" if evaluating else "train")
        o.setdefault("mode", "val" if evaluating else "train")
        refer_root = _pop_path(o, "root", root / "refer_seg")
        strings = {k: (str(v) if k in ("dataset", "split", "split_by", "image_dir") else v) for k, v in o.items()}
        return [ReferSource(refer_root, **(sampling | strings))]
    if kind == "refer_seg":
        from pixellm_jax.data.refer import ReferSource

        refer_root = _pop_path(o, "root", root / "refer_seg")
        return [ReferSource(refer_root, ds, **(sampling | o)) for ds in REFER_DATASETS]
    if kind == "vqa":
        from pixellm_jax.data.vqa import VqaSource

        json_file = _pop_path(o, "json", root / "llava_dataset" / "llava_instruct_150k.json")
        images = _pop_path(o, "images", root / "coco" / "train2017")
        return [VqaSource(json_file, images, **o)]
    if kind in ("sem_seg", *SEMSEG_NAMES):
        from pixellm_jax.data.semseg import semseg_sources

        base = _pop_path(o, "root", root)
        names = str(o.pop("names")).split("+") if "names" in o else (SEMSEG_NAMES if kind == "sem_seg" else [kind])
        return semseg_sources(base, names, **(sampling | o))
    if kind == "tfds":
        from pixellm_jax.data.tfds_source import TfdsSource

        missing = [k for k in ("name", "split", "data_dir") if k not in o]
        if missing:
            raise SpecError(f"dataset {spec.text!r}: kind 'tfds' needs {', '.join(missing)}")
        name, split, data_dir = str(o.pop("name")), str(o.pop("split")), str(o.pop("data_dir"))
        source = TfdsSource(name, split, data_dir, **o)
        if evaluating and source.kind in REFERRING_RECORDS and "mode" not in o:
            source = TfdsSource(name, split, data_dir, mode="val", **o)
        return [source]
    from pixellm_jax.data.synthetic import SyntheticShapes

    o.setdefault("num_samples", ctx.synthetic_samples)
    o.setdefault("seed", ctx.seed)
    o.setdefault("max_targets", ctx.max_targets)
    return [SyntheticShapes(**o)]


def open_spec(spec: DatasetSpec | str, ctx: SpecContext) -> list[Source]:
    """The sources a spec names (several for the group kinds `refer_seg` and `sem_seg`)."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    try:
        sources = _sources(spec, ctx)
    except TypeError as e:  # an unknown key
        raise SpecError(f"dataset {spec.text!r}: {e}") from None
    if spec.limit is not None:
        sources = [FirstRecords(s, spec.limit) for s in sources]
    return sources


def is_referring(spec: DatasetSpec, source: Source) -> bool:
    """Whether a spec's data are referring expressions (scored teacher-forced by default)."""
    if spec.kind == "tfds":
        return getattr(source, "kind", None) in REFERRING_RECORDS
    return spec.kind in ("refer", "refer_seg", *REFER_DATASETS)


def default_name(spec: DatasetSpec, source: Source, ctx: SpecContext) -> str:
    """The name a spec's results are reported under when it gives none."""
    if spec.name:
        return spec.name
    if spec.kind in ("refer", *REFER_DATASETS):
        split = spec.options.get("split", "val" if ctx.purpose == "eval" else "train")
        return f"{source.name}_{split}" + ("_multi" if spec.options.get("mode") == "val_multi" else "")
    if spec.kind == "tfds":
        return f"{source.name}_{spec.options['split']}"
    return spec.kind


def protocol_of(spec: DatasetSpec, source: Source) -> str:
    """The spec's protocol, or the official one of its kind."""
    return spec.protocol or ("teacher_forced" if is_referring(spec, source) else "generate")
