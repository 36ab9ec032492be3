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

    def __post_init__(self):
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            raise ValueError(f"{self.sample_id}: image must be [H, W, 3] uint8, got {self.image.shape} {self.image.dtype}")
        h, w = self.image.shape[:2]
        for i, c in enumerate(self.conversations):
            if c.masks.shape[1:] != (h, w):
                raise ValueError(f"{self.sample_id}: conversation {i} masks {c.masks.shape[1:]} != image {(h, w)}")


class BadSample(Exception):
    """A sample that cannot be used (missing/corrupt image, malformed annotation, ...).

    The pipeline skips and counts it (logging `sample_id` and `reason`), or stops with it, by config.
    """

    def __init__(self, sample_id: str, reason: str):
        super().__init__(f"{sample_id}: {reason}")
        self.sample_id = sample_id
        self.reason = reason


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
