"""refCOCO, refCOCO+, refCOCOg and refCLEF read from the REFER release layout.

Layout (as the official code expects it under `dataset/refer_seg/`):

    <refer_root>/<dataset>/refs(<split_by>).p     pickle: list of refs {ref_id, ann_id, image_id,
                                                   split, sentences: [{sent, ...}], ...}
    <refer_root>/<dataset>/instances.json          COCO-style {images, annotations, categories}
    <refer_root>/images/mscoco/images/train2014/   COCO images (refcoco, refcoco+, refcocog)
    <refer_root>/images/saiapr_tc-12/              IAPR TC-12 images (refclef)

One sample per image that has refs in the split. Modes:
- "train": up to num_classes_per_sample·num_classes_per_question expressions drawn at random,
  spread over up to num_classes_per_sample questions (reference §2.7);
- "val": every sentence of the image as its own single-referring question, teacher-forced answer;
- "val_multi": the sentences grouped 6, 5, 4, ... into multi-referring questions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from pixellm_jax.data import templates
from pixellm_jax.data.dataset_io import (
    DatasetFileError,
    build_sample,
    check_image_size,
    decode_segmentation,
    image_size_of,
    load_image,
    read_json,
    read_plain_pickle,
    resolve_in_root,
    stack_masks,
)
from pixellm_jax.data.sample import BadSample, Sample, Source

DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd", "refclef": "unc"}
IMAGE_DIRS = {
    "refcoco": "images/mscoco/images/train2014",
    "refcoco+": "images/mscoco/images/train2014",
    "refcocog": "images/mscoco/images/train2014",
    "refclef": "images/saiapr_tc-12",
}


def split_matches(ref_split: str, split: str) -> bool:
    """REFER's split filter: "testA"/"testB"/"testC" match any split containing the letter,
    "test" matches every test split, anything else matches exactly."""
    if split in ("testA", "testB", "testC"):
        return split[-1] in ref_split
    if split == "test":
        return "test" in ref_split
    return ref_split == split


def _check_refs(refs: object, path: Path) -> list[dict]:
    if not isinstance(refs, list):
        raise DatasetFileError(path, f"expected a list of refs, got {type(refs).__name__}")
    for i, ref in enumerate(refs):
        if not isinstance(ref, dict) or not {"ann_id", "image_id", "split", "sentences"} <= ref.keys():
            raise DatasetFileError(path, f"ref {i} lacks ann_id/image_id/split/sentences")
        if not isinstance(ref["image_id"], int) or not isinstance(ref["sentences"], list):
            raise DatasetFileError(path, f"ref {i}: image_id must be an integer and sentences a list")
    return refs


class ReferSource(Source):
    """A REFER dataset (refcoco, refcoco+, refcocog, refclef) as a random-access source."""

    def __init__(
        self,
        refer_root: str | Path,
        dataset: str = "refcoco",
        split: str = "train",
        split_by: str | None = None,
        mode: Literal["train", "val", "val_multi"] = "train",
        image_dir: str | Path | None = None,
        num_classes_per_sample: int = 3,
        num_classes_per_question: int = 3,
        questions: Sequence[str] = templates.SHORT_QUESTION_LIST,
    ):
        if mode not in ("train", "val", "val_multi"):
            raise ValueError(f"mode must be train, val or val_multi, got {mode!r}")
        if image_dir is None and dataset not in IMAGE_DIRS:
            raise ValueError(f"unknown REFER dataset {dataset!r}; pass image_dir for other datasets")
        root = Path(refer_root)
        split_by = split_by or DEFAULT_SPLIT_BY.get(dataset, "unc")
        self.name = dataset
        self.mode = mode
        self.image_dir = Path(image_dir) if image_dir is not None else root / IMAGE_DIRS[dataset]
        self.num_classes_per_sample = num_classes_per_sample
        self.num_classes_per_question = num_classes_per_question
        self.questions = tuple(questions)

        refs_path = root / dataset / f"refs({split_by}).p"
        refs = _check_refs(read_plain_pickle(refs_path), refs_path)
        instances_path = root / dataset / "instances.json"
        instances = read_json(instances_path)
        if not isinstance(instances, dict) or not all(isinstance(instances.get(k), list) for k in ("images", "annotations")):
            raise DatasetFileError(instances_path, "expected an object with 'images' and 'annotations' lists")
        try:
            self._images = {img["id"]: img for img in instances["images"]}
            self._anns = {ann["id"]: ann for ann in instances["annotations"]}
        except (TypeError, KeyError) as e:
            raise DatasetFileError(instances_path, f"image or annotation without an id: {e}") from None

        self._img2refs: dict[int, list[dict]] = {}
        for ref in refs:
            if split_matches(str(ref["split"]), split):
                self._img2refs.setdefault(ref["image_id"], []).append(ref)
        self._image_ids = sorted(self._img2refs)
        if not self._image_ids:
            raise DatasetFileError(refs_path, f"no refs in split {split!r}")

    def __len__(self) -> int:
        return len(self._image_ids)

    def get(self, index: int, rng: np.random.Generator) -> Sample:
        image_id = self._image_ids[index]
        sample_id = f"{self.name}:image_id={image_id}"
        info = self._images.get(image_id)
        if not isinstance(info, dict):
            raise BadSample(sample_id, "image id missing from instances.json")
        sample_id = f"{self.name}:{info.get('file_name')}"
        path = resolve_in_root(self.image_dir, info.get("file_name"), sample_id)
        image = load_image(path, sample_id)
        height, width = image_size_of(info, sample_id)
        check_image_size(image, height, width, sample_id, path)

        sents: list[tuple[str, object]] = []
        for ref in self._img2refs[image_id]:
            for sent in ref["sentences"]:
                if not isinstance(sent, dict) or not isinstance(sent.get("sent"), str):
                    raise BadSample(sample_id, f"ref {ref.get('ref_id')}: sentence without a 'sent' string")
                sents.append((sent["sent"], ref["ann_id"]))
        if not sents:
            raise BadSample(sample_id, "no referring sentences")

        cache: dict[object, np.ndarray] = {}

        def mask_of(ann_id: object) -> np.ndarray:
            if ann_id not in cache:
                ann = self._anns.get(ann_id)
                if not isinstance(ann, dict) or "segmentation" not in ann:
                    raise BadSample(sample_id, f"annotation {ann_id!r} missing from instances.json")
                cache[ann_id] = decode_segmentation(ann["segmentation"], height, width, sample_id)
            return cache[ann_id]

        conversations = []
        if self.mode == "train":
            groups = templates.sample_targets(sents, rng, self.num_classes_per_sample, self.num_classes_per_question)
            for group in groups:
                turn = templates.segmentation_turn([t for t, _ in group], rng, self.questions)
                conversations.append(([turn], stack_masks([mask_of(a) for _, a in group], height, width)))
        else:
            lowered = [(t.strip().lower(), a) for t, a in sents]
            if self.mode == "val":
                groups = [[s] for s in lowered]
            else:
                groups = [[lowered[i] for i in r] for r in templates.multi_referring_groups(len(lowered))]
            for group in groups:
                texts = [t for t, _ in group]
                if self.mode == "val":
                    turn = templates.referring_eval_turn(texts[0])
                else:
                    turn = templates.multi_referring_eval_turn(texts)
                conversations.append(([turn], stack_masks([mask_of(a) for _, a in group], height, width)))
        return build_sample(sample_id, self.name, image, conversations)
