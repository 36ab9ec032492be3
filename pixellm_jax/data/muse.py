"""MUSE, the multi-target reasoning segmentation dataset (reference §2.7, §7), from its JSON release.

The JSON file (`muse_train.json`, `muse_val.json`, ...) is a list of per-image records:
`file_name` (a COCO train2014 name) or `coco_url` (train2017/val2017; its basename is the file),
`height`, `width`, `ann_list` (all instances), `questions` [str], `answers` (per question, the
instances it refers to, each with `segmentation` as COCO polygons or RLE, `category_name`, optional
`rephrased_name`), and optional `text_answers` [str | None] marking each target with "{seg}".

Every question of an image becomes its own conversation. A question whose "{seg}" count differs
from its number of instances (issue #6) is skipped, counted in `skipped_questions` and logged; the
official loader dropped the whole image instead.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

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
    resolve_in_root,
    stack_masks,
)
from pixellm_jax.data.sample import BadSample, Sample, Source

log = logging.getLogger(__name__)


class MuseSource(Source):
    """MUSE records as samples. `image_root` holds train2014/, train2017/ and val2017/ (officially
    `dataset/refer_seg/images/mscoco/images`)."""

    name = "muse"

    def __init__(
        self,
        json_file: str | Path,
        image_root: str | Path,
        questions: Sequence[str] = templates.LONG_QUESTION_LIST,
    ):
        self.image_root = Path(image_root)
        self.questions = tuple(questions)
        self.skipped_questions = 0
        self._records = read_json(json_file)
        if not isinstance(self._records, list):
            raise DatasetFileError(json_file, f"expected a list of image records, got {type(self._records).__name__}")
        if not self._records:
            raise DatasetFileError(json_file, "no records: empty dataset")

    def __len__(self) -> int:
        return len(self._records)

    def _image_path(self, rec: dict, sample_id: str) -> Path:
        if "file_name" in rec:
            return resolve_in_root(self.image_root / "train2014", rec["file_name"], sample_id)
        url = rec.get("coco_url")
        if not isinstance(url, str):
            raise BadSample(sample_id, "record has neither file_name nor coco_url")
        split = "train2017" if "train2017" in url else "val2017"
        return resolve_in_root(self.image_root / split, url.split("/")[-1], sample_id)

    def scene_mask(self, index: int) -> np.ndarray | None:
        """[H, W] bool, the union of every instance the image's `ann_list` annotates: what a predictor
        that marks everything would answer for each target (evaluation's `baseline_giou`); None when
        the record has no usable ann_list (the sample itself then fails in `get`)."""
        rec = self._records[index]
        anns = rec.get("ann_list") if isinstance(rec, dict) else None
        if not isinstance(anns, list) or not anns or not all(isinstance(a, dict) for a in anns):
            return None
        sample_id = f"muse:{index}"
        height, width = image_size_of(rec, sample_id)
        masks = [decode_segmentation(a.get("segmentation"), height, width, sample_id) for a in anns]
        return np.any(stack_masks(masks, height, width), axis=0)

    def get(self, index: int, rng: np.random.Generator) -> Sample:
        rec = self._records[index]
        sample_id = f"muse:{index}"
        if not isinstance(rec, dict):
            raise BadSample(sample_id, "record is not an object")
        path = self._image_path(rec, sample_id)
        sample_id = f"muse:{path.name}"
        questions, answers = rec.get("questions"), rec.get("answers")
        if not isinstance(questions, list) or not isinstance(answers, list) or len(questions) != len(answers):
            raise BadSample(sample_id, "needs 'questions' and 'answers' lists of equal length")
        text_answers = rec.get("text_answers", [None] * len(questions))
        if not isinstance(text_answers, list) or len(text_answers) != len(questions):
            raise BadSample(sample_id, "'text_answers' must be a list aligned with 'questions'")
        if not isinstance(rec.get("ann_list"), list) or not rec["ann_list"]:
            raise BadSample(sample_id, "empty or missing ann_list")
        image = load_image(path, sample_id)
        height, width = image_size_of(rec, sample_id)
        check_image_size(image, height, width, sample_id, path)

        conversations, dropped = [], []
        for qi, (text, instances, text_answer) in enumerate(zip(questions, answers, text_answers)):
            if not isinstance(text, str) or not isinstance(instances, list) or not all(isinstance(a, dict) for a in instances):
                raise BadSample(sample_id, f"question {qi}: expected a string and a list of instance objects")
            if text_answer is None and not all("category_name" in a for a in instances):
                raise BadSample(sample_id, f"question {qi}: instance without category_name")
            if text_answer is not None and not isinstance(text_answer, str):
                raise BadSample(sample_id, f"question {qi}: text answer is not a string")
            question = templates.muse_question(text, rng, self.questions)
            answer = templates.muse_answer(instances, text_answer, rng)
            if answer is None:
                self.skipped_questions += 1
                if text_answer is None:
                    reason = "no target instances"
                else:
                    reason = f"text answer has {text_answer.count('{seg}')} {{seg}} for {len(instances)} instances"
                log.warning("%s: question %d skipped: %s", sample_id, qi, reason)
                dropped.append("seg_mismatch" if text_answer is not None else "malformed_record")
                continue
            masks = [decode_segmentation(a.get("segmentation"), height, width, sample_id) for a in instances]
            conversations.append(([(question, answer)], stack_masks(masks, height, width)))
        if not conversations:
            raise BadSample(sample_id, f"all {len(questions)} questions skipped")
        sample = build_sample(sample_id, self.name, image, conversations)
        sample.dropped = dropped
        return sample
