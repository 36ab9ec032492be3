"""Evaluation batches: every conversation of every sample, in order, packed into fixed shapes.

Unlike the training pipeline nothing is shuffled, dropped or resized: each conversation of a sample
becomes one row (an `EvalItem`), with its ground-truth masks kept on the host at the image's
original resolution. Rows are packed `rows` at a time over at most `images` images (a sample with
more conversations than fit continues in the next batch, its image encoded again). With `groups` > 1
(one per local device) a batch is `groups` such blocks of `images / groups` images and
`rows / groups` rows, each row's image in its own block, so a sharded batch gathers image features
per device (`models/grouped_take.py`). Shapes:

  pixels [images, S, S, 3] f32, resized_hw / original_hw [images, 2] i32,
  input_ids [rows, T] i32 (one IMAGE_TOKEN, right-padded with pad_id), attention_mask [rows, T] bool,
  conv_image [rows] i32, conv_valid [rows] bool

T is the smallest `token_buckets` entry that fits the longest row (or the next multiple of 64), and
`out_hw`, the canvas the masks are post-processed onto, is the largest original height and width
rounded up to `canvas_step`; so a run compiles once per (T, out_hw) bucket. Padding rows and images
copy the first row / image of their block (of the batch, for an empty block; finite, ignored). Each
sample is read with rng = default_rng([seed, index]), so its questions (templates drawn at random) do
not depend on batching or on the number of processes.

Protocols: "teacher_forced" rows hold the whole conversation with its reference answer (official
referring evaluation); "generate" rows hold the generation prompt of the first question.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import numpy as np

from pixellm_jax.data.blocks import block_first_rows
from pixellm_jax.data.conversation import LegacyTokenizer, tokenize_generation, tokenize_training
from pixellm_jax.data.sample import IMAGE_PLACEHOLDER, BadSample, Source
from pixellm_jax.data.specs import PROTOCOLS
from pixellm_jax.data.transforms import Normalization, check_image_shape, preprocess_image

log = logging.getLogger(__name__)

Protocol = Literal["teacher_forced", "generate"]


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
    # [H, W] bool union of every annotated instance of the image (MUSE sources), for the baseline
    scene: np.ndarray | None = None


@dataclass
class EvalBatch:
    arrays: dict[str, np.ndarray]  # the schema in the module doc
    items: list[EvalItem]  # in stream order
    out_hw: tuple[int, int]
    rows: list[int]  # the row of each item; every other row is padding
    groups: int = 1  # blocks (see the module doc)

    def placed(self) -> Iterator[tuple[int, EvalItem]]:
        """(row, item) for every item, in stream order."""
        return zip(self.rows, self.items)


@dataclass(frozen=True)
class BatchShape:
    images: int = 8  # images per batch (this process)
    rows: int = 8  # conversation rows per batch (this process)
    groups: int = 1  # blocks per batch, each row's image in its row's block (one per local device)
    image_size: int = 448
    normalization: Normalization = "official"
    token_buckets: tuple[int, ...] = (64, 128, 257)
    canvas_step: int = 128
    use_im_start_end: bool = True


def inference_shape(cfg, devices: int, images: int = 8, rows: int = 8, canvas_step: int = 128) -> BatchShape:
    """The batch shape of `pixellm eval` / `predict` for config `cfg`, rounded up to whole `devices`."""
    return BatchShape(
        images=-(-images // devices) * devices, rows=-(-rows // devices) * devices,
        image_size=cfg.model.vision.image_size, normalization=cfg.data.normalization,
        token_buckets=tuple(cfg.data.token_buckets), canvas_step=canvas_step,
        use_im_start_end=cfg.data.use_im_start_end, groups=devices,
    )


def round_up(value: int, step: int) -> int:
    return -(-int(value) // step) * step


def token_bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding `length` tokens, else the next multiple of 64."""
    return next((b for b in buckets if b >= length), round_up(length, 64))


def sample_items(
    source: Source, index: int, tok: LegacyTokenizer, protocol: Protocol, seed: int, use_im_start_end: bool
) -> tuple[np.ndarray, list[EvalItem]]:
    """The image and the evaluated conversations of one sample; an empty image raises BadSample."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {protocol!r}; known: {PROTOCOLS}")
    sample = source.get(index, np.random.default_rng([seed, index]))
    try:
        check_image_shape(sample.image)
    except ValueError as e:
        raise BadSample(sample.sample_id, str(e)) from None
    items = []
    scene = None
    if hasattr(source, "scene_mask"):
        try:
            scene = source.scene_mask(index)
        except BadSample:  # an unreadable instance no question refers to: no baseline for this image
            scene = None
    for ci, conv in enumerate(sample.conversations):
        question, answer = conv.turns[0]
        if protocol == "teacher_forced":
            ids = tokenize_training(tok, conv.turns, 1 << 30, use_im_start_end).input_ids
        else:
            ids = tokenize_generation(tok, question, use_im_start_end=use_im_start_end)
        text = question.replace(IMAGE_PLACEHOLDER, "").strip()
        items.append(EvalItem(index, ci, sample.sample_id, text, answer, conv.masks, ids, scene))
    return sample.image, items


Block = tuple[list[np.ndarray], list[tuple[int, EvalItem]]]  # images, (image slot, item) rows


def pack(
    stream: Iterator[tuple[np.ndarray, list[EvalItem]]], shape: BatchShape, pad_id: int
) -> Iterator[EvalBatch]:
    """Pack (image, items) pairs into batches of `shape.groups` blocks (see module doc)."""
    if shape.images % shape.groups or shape.rows % shape.groups:
        raise ValueError(f"{shape.images} images and {shape.rows} rows per batch do not split into "
                         f"{shape.groups} blocks")
    per_images, per_rows = shape.images // shape.groups, shape.rows // shape.groups
    done: list[Block] = []
    images: list[np.ndarray] = []
    rows: list[tuple[int, EvalItem]] = []
    for image, items in stream:
        slot = None
        for item in items:
            if len(rows) == per_rows or (slot is None and len(images) == per_images):
                done.append((images, rows))
                images, rows, slot = [], [], None
                if len(done) == shape.groups:
                    yield collate(done, shape, pad_id)
                    done = []
            if slot is None:
                images.append(image)
                slot = len(images) - 1
            rows.append((slot, item))
    if rows:
        done.append((images, rows))
    if done:
        yield collate(done, shape, pad_id)


def collate(blocks: Sequence[Block], shape: BatchShape, pad_id: int) -> EvalBatch:
    """Fixed-shape arrays for up to `shape.groups` blocks of images and rows (missing blocks are padding)."""
    s = shape.image_size
    per_images, per_rows = shape.images // shape.groups, shape.rows // shape.groups
    t = token_bucket(max(len(item.input_ids) for _, rows in blocks for _, item in rows), shape.token_buckets)
    arrays = {
        "pixels": np.zeros((shape.images, s, s, 3), np.float32),
        "resized_hw": np.zeros((shape.images, 2), np.int32),
        "original_hw": np.zeros((shape.images, 2), np.int32),
        "input_ids": np.full((shape.rows, t), pad_id, np.int32),
        "attention_mask": np.zeros((shape.rows, t), bool),
        "conv_image": block_first_rows(shape.groups, shape.images, shape.rows),  # padding rows
        "conv_valid": np.zeros((shape.rows,), bool),
    }
    items, placed = [], []
    for g in range(shape.groups):
        images, rows = blocks[g] if g < len(blocks) else ([], [])
        i0, r0 = g * per_images, g * per_rows
        for i, image in enumerate(images):
            prepared = preprocess_image(image, s, shape.normalization)
            arrays["pixels"][i0 + i] = prepared.pixels
            arrays["resized_hw"][i0 + i] = prepared.resized_hw
            arrays["original_hw"][i0 + i] = prepared.original_hw
        for key in ("pixels", "resized_hw", "original_hw"):  # an empty block copies the batch's first image
            arrays[key][i0 + len(images): i0 + per_images] = arrays[key][i0 if images else 0]
        for j, (slot, item) in enumerate(rows):
            n = len(item.input_ids)
            arrays["input_ids"][r0 + j, :n] = item.input_ids
            arrays["attention_mask"][r0 + j, :n] = True
            arrays["conv_image"][r0 + j] = i0 + slot
            arrays["conv_valid"][r0 + j] = True
            items.append(item)
            placed.append(r0 + j)
        for key in ("input_ids", "attention_mask"):
            arrays[key][r0 + len(rows): r0 + per_rows] = arrays[key][r0 if rows else 0]
    hw = arrays["original_hw"].max(axis=0)
    out_hw = (round_up(hw[0], shape.canvas_step), round_up(hw[1], shape.canvas_step))
    return EvalBatch(arrays, items, out_hw, placed, shape.groups)


def eval_batches(
    source: Source,
    tok: LegacyTokenizer,
    protocol: Protocol,
    shape: BatchShape,
    *,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    skipped: list[tuple[str, str]] | None = None,
    progress=None,
) -> Iterator[EvalBatch]:
    """This process's batches: samples process_index, process_index + process_count, ...

    A sample the source rejects (`BadSample`) is logged and (its id, the reason) appended to `skipped`;
    `progress` (a tqdm bar) advances by one per sample read.
    """

    def stream():
        for i in range(process_index, len(source), process_count):
            try:
                yield sample_items(source, i, tok, protocol, seed, shape.use_im_start_end)
            except BadSample as e:
                log.warning("evaluation skips %s: %s", e.sample_id, e.reason)
                if skipped is not None:
                    skipped.append((e.sample_id, e.reason))
            if progress is not None:
                progress.update(1)

    return pack(stream(), shape, tok.pad_id)
