"""Evaluation batches: every conversation of every sample, in order, packed into fixed shapes.

Unlike the training pipeline nothing is shuffled, dropped or resized: each conversation of a sample
becomes one row (an `EvalItem`), with its ground-truth masks kept on the host at the image's
original resolution. Rows are packed `rows` at a time over at most `images` images (a sample with
more conversations than fit continues in the next batch, its image encoded again). Shapes:

  pixels [images, S, S, 3] f32, resized_hw / original_hw [images, 2] i32,
  input_ids [rows, T] i32 (one IMAGE_TOKEN, right-padded with pad_id), attention_mask [rows, T] bool,
  conv_image [rows] i32, conv_valid [rows] bool

T is the smallest `token_buckets` entry that fits the longest row (or the next multiple of 64), and
`out_hw`, the canvas the masks are post-processed onto, is the largest original height and width
rounded up to `canvas_step`; so a run compiles once per (T, out_hw) bucket. Padding rows and images
copy row / image 0 (finite, ignored). Each sample is read with rng = default_rng([seed, index]), so
its questions (templates drawn at random) do not depend on batching or on the number of processes.

Protocols: "teacher_forced" rows hold the whole conversation with its reference answer (official
referring evaluation); "generate" rows hold the generation prompt of the first question.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import numpy as np

from pixellm_jax.data.conversation import LegacyTokenizer, tokenize_generation, tokenize_training
from pixellm_jax.data.sample import IMAGE_PLACEHOLDER, BadSample, Source
from pixellm_jax.data.transforms import Normalization, preprocess_image

log = logging.getLogger(__name__)

Protocol = Literal["teacher_forced", "generate"]
PROTOCOLS = ("teacher_forced", "generate")


@dataclass
class EvalItem:
    """One evaluated conversation (a row of a batch)."""

    sample_index: int  # index in the source
    conversation: int  # index of the conversation in the sample
    sample_id: str
    question: str  # the first question, without the image placeholder
    answer: str  # the reference answer, one SEG_PLACEHOLDER per target
    gt: np.ndarray  # [k, H, W] bool ground-truth masks at the original resolution
    input_ids: np.ndarray  # [t] int32 token ids of the row


@dataclass
class EvalBatch:
    arrays: dict[str, np.ndarray]  # the schema in the module doc
    items: list[EvalItem]  # rows 0 .. len(items) − 1; the rest are padding
    out_hw: tuple[int, int]


@dataclass(frozen=True)
class BatchShape:
    images: int = 8  # images per batch (this process)
    rows: int = 8  # conversation rows per batch (this process)
    image_size: int = 448
    normalization: Normalization = "official"
    token_buckets: tuple[int, ...] = (64, 128, 257)
    canvas_step: int = 128
    use_im_start_end: bool = True


def round_up(value: int, step: int) -> int:
    return -(-int(value) // step) * step


def token_bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding `length` tokens, else the next multiple of 64."""
    return next((b for b in buckets if b >= length), round_up(length, 64))


def sample_items(
    source: Source, index: int, tok: LegacyTokenizer, protocol: Protocol, seed: int, use_im_start_end: bool
) -> tuple[np.ndarray, list[EvalItem]]:
    """The image and the evaluated conversations of one sample."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {protocol!r}; known: {PROTOCOLS}")
    sample = source.get(index, np.random.default_rng([seed, index]))
    items = []
    for ci, conv in enumerate(sample.conversations):
        question, answer = conv.turns[0]
        if protocol == "teacher_forced":
            ids = tokenize_training(tok, conv.turns, 1 << 30, use_im_start_end).input_ids
        else:
            ids = tokenize_generation(tok, question, use_im_start_end=use_im_start_end)
        text = question.replace(IMAGE_PLACEHOLDER, "").strip()
        items.append(EvalItem(index, ci, sample.sample_id, text, answer, conv.masks, ids))
    return sample.image, items


def pack(
    stream: Iterator[tuple[np.ndarray, list[EvalItem]]], shape: BatchShape, pad_id: int
) -> Iterator[EvalBatch]:
    """Pack (image, items) pairs into batches (see module doc)."""
    images: list[np.ndarray] = []
    rows: list[tuple[int, EvalItem]] = []
    for image, items in stream:
        slot = None
        for item in items:
            if len(rows) == shape.rows or (slot is None and len(images) == shape.images):
                yield collate(images, rows, shape, pad_id)
                images, rows, slot = [], [], None
            if slot is None:
                images.append(image)
                slot = len(images) - 1
            rows.append((slot, item))
    if rows:
        yield collate(images, rows, shape, pad_id)


def collate(images: list[np.ndarray], rows: list[tuple[int, EvalItem]], shape: BatchShape, pad_id: int) -> EvalBatch:
    """Fixed-shape arrays for up to `shape.images` images and `shape.rows` rows."""
    s = shape.image_size
    t = token_bucket(max(len(item.input_ids) for _, item in rows), shape.token_buckets)
    arrays = {
        "pixels": np.zeros((shape.images, s, s, 3), np.float32),
        "resized_hw": np.zeros((shape.images, 2), np.int32),
        "original_hw": np.zeros((shape.images, 2), np.int32),
        "input_ids": np.full((shape.rows, t), pad_id, np.int32),
        "attention_mask": np.zeros((shape.rows, t), bool),
        "conv_image": np.zeros((shape.rows,), np.int32),
        "conv_valid": np.zeros((shape.rows,), bool),
    }
    for i, image in enumerate(images):
        prepared = preprocess_image(image, s, shape.normalization)
        arrays["pixels"][i] = prepared.pixels
        arrays["resized_hw"][i] = prepared.resized_hw
        arrays["original_hw"][i] = prepared.original_hw
    for j, (slot, item) in enumerate(rows):
        n = len(item.input_ids)
        arrays["input_ids"][j, :n] = item.input_ids
        arrays["attention_mask"][j, :n] = True
        arrays["conv_image"][j] = slot
        arrays["conv_valid"][j] = True
    for key in ("pixels", "resized_hw", "original_hw"):
        arrays[key][len(images):] = arrays[key][0]
    for key in ("input_ids", "attention_mask", "conv_image"):
        arrays[key][len(rows):] = arrays[key][0]
    hw = arrays["original_hw"].max(axis=0)
    out_hw = (round_up(hw[0], shape.canvas_step), round_up(hw[1], shape.canvas_step))
    return EvalBatch(arrays, [item for _, item in rows], out_hw)


def eval_batches(
    source: Source,
    tok: LegacyTokenizer,
    protocol: Protocol,
    shape: BatchShape,
    *,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    skipped: list[str] | None = None,
    progress=None,
) -> Iterator[EvalBatch]:
    """This process's batches: samples process_index, process_index + process_count, ...

    A sample the source rejects (`BadSample`) is logged and its id appended to `skipped`;
    `progress` (a tqdm bar) advances by one per sample read.
    """

    def stream():
        for i in range(process_index, len(source), process_count):
            try:
                yield sample_items(source, i, tok, protocol, seed, shape.use_im_start_end)
            except BadSample as e:
                log.warning("evaluation skips %s: %s", e.sample_id, e.reason)
                if skipped is not None:
                    skipped.append(e.sample_id)
            if progress is not None:
                progress.update(1)

    return pack(stream(), shape, tok.pad_id)
