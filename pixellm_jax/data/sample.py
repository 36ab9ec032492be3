"""The record every data source yields, before templates, tokenisation and transforms.

A source turns its on-disk annotation into `Sample`s: one image and one or more conversations about
it. Each conversation is a list of (question, answer) turns in plain text. In an answer every
target is written as the placeholder `SEG_PLACEHOLDER`; tokenisation later replaces each by the
N·L codebook tokens. `masks` holds one mask per placeholder of the conversation, in order of
occurrence, at the image's original resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Stands for one target's group of codebook tokens in answer text ("[SEG0] ... [SEG5]" officially).
SEG_PLACEHOLDER = "[SEG]"
# Marks where the image goes in the first question (LLaVA's DEFAULT_IMAGE_TOKEN).
IMAGE_PLACEHOLDER = "<image>"


@dataclass
class Conversation:
    turns: list[tuple[str, str]]  # (question, answer); the first question starts with "<image>\n"
    masks: np.ndarray  # [k, H, W] bool, one per SEG_PLACEHOLDER in the answers, in order

    def __post_init__(self):
        k = sum(a.count(SEG_PLACEHOLDER) for _, a in self.turns)
        if self.masks.ndim != 3 or self.masks.shape[0] != k:
            raise ValueError(
                f"conversation has {k} {SEG_PLACEHOLDER} placeholders but masks of shape {self.masks.shape}"
            )


@dataclass
class Sample:
    sample_id: str  # names the sample in logs and errors: "<dataset>:<file or index>"
    dataset: str  # source name, e.g. "refcoco", "muse", "synthetic"
    image: np.ndarray  # [H, W, 3] uint8 RGB
    conversations: list[Conversation] = field(default_factory=list)
    # Reasons (`DROP_REASONS` keys) of conversations the source left out of this sample, one each.
    dropped: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            raise ValueError(f"{self.sample_id}: image must be [H, W, 3] uint8, got {self.image.shape} {self.image.dtype}")
        h, w = self.image.shape[:2]
        for i, c in enumerate(self.conversations):
            if c.masks.shape[1:] != (h, w):
                raise ValueError(f"{self.sample_id}: conversation {i} masks {c.masks.shape[1:]} != image {(h, w)}")


# Why data was dropped, as counted in a run's metrics and summary (`bad_sample_category` sorts a
# BadSample's reason into the first group; the pipeline adds the conversation-level ones).
DROP_REASONS = {
    "bad_image": "missing, corrupt or mis-sized image",
    "bad_polygon": "malformed or out-of-bounds polygon / RLE mask",
    "seg_mismatch": "{seg} count differs from the number of targets",
    "path_escapes_root": "image path escaping the dataset root",
    "malformed_record": "malformed annotation record",
    "too_long": "conversation longer than the largest token bucket",
    "targets_truncated": "model_max_length cut some of the answer's targets",
    "too_many_targets": "more targets than model.head.max_targets",
    "batch_full": "more conversations than data.conversations_per_batch slots",
}
_CATEGORY_PATTERNS = (
    ("path_escapes_root", ("escapes the dataset root", "invalid file name")),
    ("bad_polygon", ("polygon", "RLE", "malformed segmentation")),
    ("seg_mismatch", ("{seg}", "questions skipped", "codebook tokens for", "placeholders but masks")),
    ("bad_image", ("image file not found", "corrupt", "cannot decode image", "cannot read image", "stored image",
                   "invalid image size", "label file not found", "label map", "annotation says", "image must be",
                   "record says")),
)


def bad_sample_category(reason: str) -> str:
    """The `DROP_REASONS` key of a BadSample's free-text reason ("malformed_record" when none fits)."""
    for category, patterns in _CATEGORY_PATTERNS:
        if any(p in reason for p in patterns):
            return category
    return "malformed_record"


class BadSample(Exception):
    """A sample that cannot be used (missing/corrupt image, malformed annotation, ...).

    The pipeline skips and counts it (logging `sample_id` and `reason`), or stops with it, by config.
    """

    def __init__(self, sample_id: str, reason: str):
        super().__init__(f"{sample_id}: {reason}")
        self.sample_id = sample_id
        self.reason = reason

    @property
    def category(self) -> str:
        return bad_sample_category(self.reason)


class Source:
    """A random-access dataset of `Sample`s.

    `get(index, rng)` must be deterministic given `index` and the state of `rng` (templates and
    target choices draw from it), and raises `BadSample` for unusable records.
    """

    name: str = ""

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, index: int, rng: np.random.Generator) -> Sample:
        raise NotImplementedError
