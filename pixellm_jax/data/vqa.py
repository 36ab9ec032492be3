"""LLaVA-Instruct-150k visual instruction data: multi-turn conversations without targets.

The JSON file (officially `dataset/llava_dataset/llava_instruct_150k.json`) is a list of records
{`id`, `image` (a file name under `image_dir`, officially `dataset/coco/train2017`),
`conversations`: [{`from`: "human" | "gpt", `value`}]}. Each record is one conversation of all
its turns, "<image>" moved to the front of the first question, with zero masks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pixellm_jax.data import templates
from pixellm_jax.data.dataset_io import DatasetFileError, build_sample, load_image, read_json, resolve_in_root
from pixellm_jax.data.sample import BadSample, Sample, Source


class VqaSource(Source):
    """LLaVA-Instruct conversations as samples with no segmentation targets."""

    name = "vqa"

    def __init__(self, json_file: str | Path, image_dir: str | Path):
        self.image_dir = Path(image_dir)
        self._records = read_json(json_file)
        if not isinstance(self._records, list):
            raise DatasetFileError(json_file, f"expected a list of records, got {type(self._records).__name__}")
        if not self._records:
            raise DatasetFileError(json_file, "no records: empty dataset")

    def __len__(self) -> int:
        return len(self._records)

    def get(self, index: int, rng: np.random.Generator) -> Sample:
        rec = self._records[index]
        sample_id = f"vqa:{index}"
        if not isinstance(rec, dict):
            raise BadSample(sample_id, "record is not an object")
        sample_id = f"vqa:{rec.get('id', index)}"
        path = resolve_in_root(self.image_dir, rec.get("image"), sample_id)
        messages = rec.get("conversations")
        if not isinstance(messages, list):
            raise BadSample(sample_id, "record has no 'conversations' list")
        try:
            turns = templates.vqa_turns(messages)
        except ValueError as e:
            raise BadSample(sample_id, f"malformed conversation: {e}") from None
        image = load_image(path, sample_id)
        masks = np.zeros((0, *image.shape[:2]), dtype=bool)
        return build_sample(sample_id, self.name, image, [(turns, masks)])
