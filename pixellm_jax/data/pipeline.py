"""The Grain input pipeline: sources → mixture → shuffle → this process's share → samples → batches.

Stages (all deterministic for a seed):
  1. Each random-access `Source` is shuffled (its own seed, reshuffled every pass) and repeated
     without end; `grain.MapDataset.mix` interleaves them by `sample_rates` (official sem_seg :
     refer_seg : vqa : muse = 2 : 9 : 2 : 4).
  2. The mixed stream is cut into epochs of `epoch_size` records, each shuffled with its own seed
     (Grain's window shuffle); `num_epochs` bounds the stream (None = endless). The position of a
     record in this stream is its `stream_index`.
  3. Process p of P keeps records p, p + P, p + 2P, ... (`process_index` / `process_count`; default
     `jax.process_index()` / `jax.process_count()`), so shares are disjoint and cover each epoch.
  4. Per record, in Grain worker processes when `num_workers > 0`: `Source.get(index, rng)` with
     rng = default_rng([seed, stream_index]), image preprocessing (`transforms`), tokenisation with
     labels and truncation (`conversation`), GT masks onto the fixed canvas.
  5. Batches of `images_per_batch` samples are packed into fixed shapes (below) in the main process,
     as `groups` aligned blocks (one per device of the process's batch share): block g holds images
     [g·Bi/G, (g+1)·Bi/G) and conversation slots [g·Q/G, (g+1)·Q/G), and a conversation only takes a
     slot of its image's block (`data.blocks`; the image gather then stays on the device).
The iterator's position is Grain state: `it.get_state()` / `it.set_state(state)` on the iterator from
`iter(pipeline)` resumes with exactly the same batches (the trainer stores it with the checkpoint).

Dropped data is counted in `pipeline.stats` by reason (`sample.DROP_REASONS`) and logged with the
sample id:
  * a `BadSample` from a source, or a sample the transforms reject (ValueError), is skipped and
    counted under its category (bad image, bad polygon, {seg} mismatch, path escaping the root,
    malformed record) (`on_bad_sample="skip"`) or re-raised naming the sample (`"raise"`);
  * a conversation the source left out ({seg} mismatch), one with more than `max_targets` targets,
    one whose codebook tokens the truncation cut, one longer than the largest bucket, and one that
    does not fit the `conversations_per_batch` slots of its batch is dropped; a sample left without
    conversations is dropped.
  * `stats.drop_fraction` is dropped / (dropped + kept), counting a bad sample as one dropped unit and
    each conversation as one; past `max_drop_fraction` (once `DROP_CHECK_AFTER` units were seen) the
    iterator raises `TooManyDropped` naming the dominant reason and the setting that changes it;
  * when more than a whole epoch share of records in a row (at most 10,000) yields nothing, the config
    drops everything (e.g. `model_max_length` shorter than every conversation): the iterator raises
    `NothingUsable` naming the dominant reason instead of searching an endless stream forever.

Batch schema (dict of numpy arrays; Bi = images_per_batch, Q = conversations_per_batch,
M = max_targets, S = image_size, C = mask_size, T = the smallest `token_buckets` entry that fits the
batch's longest conversation):
  pixels          [Bi, S, S, 3] float32  normalised, zero-padded images
  resized_hw      [Bi, 2] int32          (h', w') after the longest-side resize (ViT / LLM key masks)
  original_hw     [Bi, 2] int32          (H, W) of the source image (evaluation resolution)
  mask_hw         [Bi, 2] int32          resolution of the GT masks on the canvas (≤ C, see transforms)
  image_valid     [Bi] bool              False for padding rows of a last, partial batch
  stream_index    [Bi] int64             position of the record in the stream, −1 for padding
  input_ids       [Q, T] int32           text ids with one IMAGE_TOKEN (−200); pad id after the end
  attention_mask  [Q, T] bool            True on real tokens
  labels          [Q, T] int32           −100 where not supervised
  conv_image      [Q] int32              image row of each conversation (its block's first row for padding)
  conv_valid      [Q] bool
  masks           [Q, M, C, C] bool      GT masks in answer order, valid region [:mask_hw]
  mask_valid      [Q, M] bool
Per-target pixel validity for the loss is `arange(C) < mask_hw[conv_image]` per axis, which is also
what `postprocess_masks(logits, resized_hw, mask_hw, (C, C))` returns as `valid`.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Sequence

import grain
import numpy as np

from pixellm_jax.data.blocks import block_first_rows
from pixellm_jax.data.conversation import LegacyTokenizer, tokenize_training
from pixellm_jax.data.sample import DROP_REASONS, BadSample, Sample, Source, bad_sample_category
from pixellm_jax.data.transforms import mask_shape, masks_to_canvas, preprocess_image
from pixellm_jax.tokens import IGNORE_INDEX

log = logging.getLogger(__name__)

DROP_CHECK_AFTER = 200  # units (conversations and bad samples) seen before the drop fraction is judged
# What to change when a reason dominates the drops.
DROP_HINTS = {
    "bad_image": "check the dataset's image folder (the spec's images=/root=, or train.dataset_dir)",
    "bad_polygon": "check the annotation file's segmentations",
    "seg_mismatch": "check the annotation file: each text answer needs one {seg} per target",
    "path_escapes_root": "check the annotation file's image paths against the image root",
    "malformed_record": "check the annotation file against its layout (docs in pixellm_jax/data/)",
    "too_long": "raise data.token_buckets' largest entry (and data.model_max_length)",
    "targets_truncated": "raise data.model_max_length",
    "too_many_targets": "raise model.head.max_targets",
    "batch_full": "raise data.conversations_per_batch",
}


@dataclass
class PipelineConfig:
    """Knobs of the input pipeline (shapes, mixture, determinism, workers, bad-data policy)."""

    images_per_batch: int = 2
    conversations_per_batch: int = 6
    max_targets: int = 3  # per conversation
    token_buckets: list[int] = field(default_factory=lambda: [64, 128, 257])
    image_size: int = 448
    mask_size: int = 448
    normalization: Literal["official", "clip"] = "official"
    model_max_length: int = 512
    n_image_tokens: int = 256  # LLM image tokens per image (llm_grid²)
    use_im_start_end: bool = True
    seed: int = 0
    epoch_size: int | None = None  # None: the most records with no source repeating within an epoch
    num_epochs: int | None = None  # None: endless
    drop_remainder: bool = True
    num_workers: int = 0  # Grain worker processes for stage 4 (0: in this process)
    worker_buffer_size: int = 2
    read_threads: int = 1  # threads per process reading records ahead
    prefetch_buffer_size: int = 8
    on_bad_sample: Literal["skip", "raise"] = "skip"
    max_drop_fraction: float | None = None  # None: no limit (the dominant reason is still counted)
    groups: int = 1  # aligned blocks per batch, each conversation in its image's block (one per device)

    @classmethod
    def from_config(cls, cfg, groups: int = 1) -> "PipelineConfig":
        """The pipeline knobs of a project `Config` (data, model shapes, seed, batch size), in `groups` blocks."""
        d, m = cfg.data, cfg.model
        return cls(
            images_per_batch=cfg.optim.micro_batch_size, conversations_per_batch=d.conversations_per_batch,
            max_targets=m.head.max_targets, token_buckets=list(d.token_buckets), image_size=m.vision.image_size,
            mask_size=d.mask_size or m.vision.image_size, normalization=d.normalization,
            model_max_length=d.model_max_length, n_image_tokens=m.projector.llm_grid ** 2,
            use_im_start_end=d.use_im_start_end, seed=cfg.seed, epoch_size=d.epoch_size, num_epochs=d.num_epochs,
            drop_remainder=d.drop_remainder, num_workers=d.num_workers, worker_buffer_size=d.worker_buffer_size,
            read_threads=d.read_threads, prefetch_buffer_size=d.prefetch_buffer_size, on_bad_sample=d.on_bad_sample,
            max_drop_fraction=d.max_drop_fraction, groups=groups,
        )

    @property
    def max_text_len(self) -> int:
        """Text tokens kept per conversation: model_max_length − (n_image_tokens − 1) (official 257)."""
        return self.model_max_length - (self.n_image_tokens - 1)

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"PipelineConfig: {msg}")

        need(self.images_per_batch > 0 and self.conversations_per_batch > 0, "batch sizes must be positive")
        need(self.max_targets > 0, "max_targets must be positive")
        need(self.groups > 0 and self.images_per_batch % self.groups == 0
             and self.conversations_per_batch % self.groups == 0,
             f"groups ({self.groups}) must divide images_per_batch ({self.images_per_batch}) and "
             f"conversations_per_batch ({self.conversations_per_batch})")
        need(len(self.token_buckets) > 0 and all(b > 0 for b in self.token_buckets), "token_buckets must be positive")
        need(list(self.token_buckets) == sorted(set(self.token_buckets)), "token_buckets must be strictly increasing")
        need(self.max_text_len > 0, "model_max_length must exceed n_image_tokens - 1")
        need(self.mask_size > 0 and self.image_size > 0, "image_size and mask_size must be positive")
        need(self.on_bad_sample in ("skip", "raise"), f"on_bad_sample must be skip|raise, got {self.on_bad_sample!r}")
        need(self.normalization in ("official", "clip"), f"unknown normalization {self.normalization!r}")
        need(self.epoch_size is None or self.epoch_size > 0, "epoch_size must be positive")
        need(self.num_epochs is None or self.num_epochs > 0, "num_epochs must be positive")


class PreparedConversation(NamedTuple):
    input_ids: np.ndarray  # [t] int32
    labels: np.ndarray  # [t] int32
    masks: np.ndarray  # [k, C, C] bool


class PreparedSample(NamedTuple):
    """One prepared record. Named tuples let Grain move the arrays through shared memory."""

    sample_id: str
    stream_index: int
    pixels: np.ndarray
    resized_hw: tuple[int, int]
    original_hw: tuple[int, int]
    mask_hw: tuple[int, int]
    conversations: list[PreparedConversation]
    dropped: list[str]  # reasons of conversations dropped while preparing


@dataclass
class Rejected:
    """A record that could not be used; counted or raised in the main process."""

    sample_id: str
    reason: str
    stream_index: int


class NothingUsable(RuntimeError):
    """Every record of a long run was dropped: the data cannot fill a batch under this config."""


class TooManyDropped(RuntimeError):
    """More than `max_drop_fraction` of the data seen so far was dropped."""


@dataclass
class PipelineStats:
    """What this pipeline's iterators produced and dropped (not part of the saved iterator state)."""

    bad_samples: int = 0
    dropped: collections.Counter = field(default_factory=collections.Counter)  # reason -> units
    examples: dict = field(default_factory=dict)  # reason -> "sample id: detail" of its first case
    conversations: int = 0  # kept (past every check, placed in a batch slot)
    samples: int = 0
    batches: int = 0
    samples_without_conversations: int = 0
    unusable_streak: int = 0  # records in a row that yielded nothing

    def drop(self, reason: str, example: str, count: int = 1) -> None:
        self.dropped[reason] += count
        self.examples.setdefault(reason, example)

    @property
    def units(self) -> int:
        """Conversations kept or dropped plus bad samples: what the drop fraction is a fraction of."""
        return self.conversations + sum(self.dropped.values())

    @property
    def drop_fraction(self) -> float:
        return sum(self.dropped.values()) / max(self.units, 1)

    def dominant(self) -> str:
        """The most common drop reason, its count, example and what to change; "" when nothing was dropped."""
        if not self.dropped:
            return ""
        reason, count = self.dropped.most_common(1)[0]
        return (f"most were {reason} ({DROP_REASONS.get(reason, reason)}: {count}, e.g. {self.examples[reason]}); "
                f"{DROP_HINTS.get(reason, 'check the data')}")

    def as_metrics(self) -> dict[str, float]:
        """Flat counters for metrics.jsonl / TensorBoard / summary.json."""
        out = {f"dropped/{reason}": float(self.dropped.get(reason, 0)) for reason in DROP_REASONS}
        out.update(bad_samples=float(self.bad_samples), drop_fraction=self.drop_fraction,
                   kept_conversations=float(self.conversations))
        return out


class _Keys:
    """Random-access (source, index) pairs of one source; the data is read later, per record."""

    def __init__(self, source_id: int, length: int):
        self.source_id, self.length = source_id, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[int, int]:
        return self.source_id, int(index)


class _Prepare:
    """Stage 4: read a record and turn it into a `PreparedSample` (runs in worker processes)."""

    def __init__(self, sources: Sequence[Source], tokenizer: LegacyTokenizer, cfg: PipelineConfig):
        self.sources, self.tokenizer, self.cfg = list(sources), tokenizer, cfg

    def __call__(self, stream_index: int, key: tuple[int, int]) -> PreparedSample | Rejected:
        source = self.sources[key[0]]
        fallback_id = f"{source.name}:{key[1]}"
        rng = np.random.default_rng([self.cfg.seed, stream_index])
        try:
            sample = source.get(key[1], rng)
        except BadSample as e:
            return Rejected(e.sample_id, e.reason, stream_index)
        except ValueError as e:  # e.g. a Sample whose image and masks disagree
            return Rejected(fallback_id, str(e), stream_index)
        try:
            return self.prepare(sample, stream_index)
        except ValueError as e:
            return Rejected(sample.sample_id, str(e), stream_index)

    def prepare(self, sample: Sample, stream_index: int) -> PreparedSample:
        cfg, tok = self.cfg, self.tokenizer
        image = preprocess_image(sample.image, cfg.image_size, cfg.normalization)
        group = len(tok.seg_ids)
        conversations, dropped = [], list(sample.dropped)
        for c in sample.conversations:
            k = c.masks.shape[0]
            if k > cfg.max_targets:
                dropped.append("too_many_targets")
                continue
            t = tokenize_training(tok, c.turns, cfg.max_text_len, cfg.use_im_start_end)
            if t.num_seg_tokens != k * group:
                if not t.truncated:
                    raise ValueError(f"{t.num_seg_tokens} codebook tokens for {k} masks")
                dropped.append("targets_truncated")
                continue
            if len(t.input_ids) > cfg.token_buckets[-1]:
                dropped.append("too_long")
                continue
            masks, _ = masks_to_canvas(c.masks, cfg.mask_size)
            conversations.append(PreparedConversation(t.input_ids, t.labels, masks))
        return PreparedSample(
            sample.sample_id, stream_index, image.pixels, image.resized_hw, image.original_hw,
            mask_shape(image.original_hw, cfg.mask_size), conversations, dropped,
        )


def _mark_absl_flags_parsed() -> None:
    """Grain's worker start reads absl flags; outside an absl app they are unparsed, so use defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class InputPipeline:
    """Batches of fixed shapes for one process, from `sources` mixed by `sample_rates`.

    `iter(pipeline)` gives a Grain `DatasetIterator` of batch dicts (schema in the module doc), with
    `get_state()` / `set_state()`. `stats` counts the dropped data of the iterators it made.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        tokenizer: LegacyTokenizer,
        cfg: PipelineConfig,
        sample_rates: Sequence[float] | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        cfg.validate()
        if not sources:
            raise ValueError("InputPipeline needs at least one source")
        empty = [s.name for s in sources if len(s) == 0]
        if empty:
            raise ValueError(f"empty data source(s): {empty}")
        rates = [1.0] * len(sources) if sample_rates is None else [float(r) for r in sample_rates]
        if len(rates) != len(sources) or min(rates) <= 0:
            raise ValueError(f"need one positive sample rate per source, got {rates} for {len(sources)} sources")
        if process_index is None or process_count is None:
            import jax

            process_index, process_count = jax.process_index(), jax.process_count()
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self.cfg, self.sources, self.tokenizer = cfg, list(sources), tokenizer
        self.sample_rates = rates
        self.process_index, self.process_count = process_index, process_count
        self.epoch_size = cfg.epoch_size or int(min(len(s) * sum(rates) / r for s, r in zip(sources, rates)))
        self.stats = PipelineStats()
        # Records in a row that may yield nothing before the config is judged to drop everything.
        self._unusable_limit = max(1, min(self.epoch_size // process_count, 10_000))

    def stream(self) -> grain.MapDataset:
        """The global stream of (source id, record index) keys, all processes together (stages 1–2)."""
        cfg = self.cfg
        parts = []
        for i, source in enumerate(self.sources):
            seed = int(np.random.SeedSequence([cfg.seed, i]).generate_state(1)[0])
            parts.append(grain.MapDataset.source(_Keys(i, len(source))).shuffle(seed=seed).repeat())
        mixed = grain.MapDataset.mix(parts, self.sample_rates) if len(parts) > 1 else parts[0]
        stream = grain.experimental.WindowShuffleMapDataset(mixed, window_size=self.epoch_size, seed=cfg.seed)
        if cfg.num_epochs is not None:
            stream = stream[: self.epoch_size * cfg.num_epochs]
        return stream

    def records(self) -> grain.MapDataset:
        """This process's share of the stream as PreparedSample / Rejected records (stages 1–4)."""
        prepared = self.stream().map_with_index(_Prepare(self.sources, self.tokenizer, self.cfg))
        return prepared[self.process_index :: self.process_count]

    def dataset(self) -> grain.IterDataset:
        """Stages 1–5 as a Grain IterDataset of batch dicts."""
        cfg = self.cfg
        ds = self.records().to_iter_dataset(
            grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch_buffer_size)
        )
        if cfg.num_workers > 0:
            _mark_absl_flags_parsed()
            ds = ds.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=cfg.num_workers, per_worker_buffer_size=cfg.worker_buffer_size)
            )
        ds = ds.filter(self._keep)
        return ds.batch(cfg.images_per_batch, drop_remainder=cfg.drop_remainder, batch_fn=self._collate)

    def __iter__(self):
        return iter(self.dataset())

    # -- main-process stages ----------------------------------------------------------------------

    def _drop(self, reason: str, sample_id: str, detail: str = "") -> None:
        self.stats.drop(reason, f"{sample_id}: {detail}" if detail else sample_id)
        log.warning("dropped a conversation of %s (%s; %d so far)", sample_id, reason, self.stats.dropped[reason])

    def _keep(self, record: PreparedSample | Rejected) -> bool:
        keep = self._usable(record)
        self.stats.unusable_streak = 0 if keep else self.stats.unusable_streak + 1
        if self.stats.unusable_streak > self._unusable_limit:
            raise NothingUsable(
                f"the last {self.stats.unusable_streak} records of {[s.name for s in self.sources]} were all "
                f"dropped (bad samples: {self.stats.bad_samples}, dropped: {dict(self.stats.dropped)}): "
                f"{self.stats.dominant()}"
            )
        limit = self.cfg.max_drop_fraction
        if limit is not None and self.stats.units >= DROP_CHECK_AFTER and self.stats.drop_fraction > limit:
            raise TooManyDropped(
                f"{self.stats.drop_fraction:.1%} of the first {self.stats.units} conversations and records of "
                f"{[s.name for s in self.sources]} were dropped (data.max_drop_fraction={limit}; counts: "
                f"{dict(self.stats.dropped)}): {self.stats.dominant()}"
            )
        return keep

    def _usable(self, record: PreparedSample | Rejected) -> bool:
        if isinstance(record, Rejected):
            if self.cfg.on_bad_sample == "raise":
                raise BadSample(record.sample_id, record.reason)
            self.stats.bad_samples += 1
            self.stats.drop(bad_sample_category(record.reason), f"{record.sample_id}: {record.reason}")
            log.warning("skipped bad sample %s: %s (%d so far)",
                        record.sample_id, record.reason, self.stats.bad_samples)
            return False
        for reason in record.dropped:
            self._drop(reason, record.sample_id)
        if not record.conversations:
            self.stats.samples_without_conversations += 1
            log.warning("dropped sample %s: no usable conversation", record.sample_id)
            return False
        return True

    def _collate(self, records: Sequence[PreparedSample]) -> dict[str, np.ndarray]:
        cfg = self.cfg
        bi, q, m = cfg.images_per_batch, cfg.conversations_per_batch, cfg.max_targets
        c, s = cfg.mask_size, cfg.image_size
        rows_per, slots_per = bi // cfg.groups, q // cfg.groups
        slots: list[tuple[int, int, object]] = []  # (conversation slot, image row, conversation)
        for g in range(cfg.groups):  # each block's conversations go to its own slots
            convs = [(row, conv) for row in range(g * rows_per, min((g + 1) * rows_per, len(records)))
                     for conv in records[row].conversations]
            for row, _ in convs[slots_per:]:
                self._drop("batch_full", records[row].sample_id)
            slots += [(g * slots_per + i, row, conv) for i, (row, conv) in enumerate(convs[:slots_per])]
        longest = max(len(conv.input_ids) for _, _, conv in slots)
        t = next(b for b in cfg.token_buckets if b >= longest)
        batch = {
            "pixels": np.zeros((bi, s, s, 3), np.float32),
            "resized_hw": np.zeros((bi, 2), np.int32),
            "original_hw": np.zeros((bi, 2), np.int32),
            "mask_hw": np.zeros((bi, 2), np.int32),
            "image_valid": np.zeros((bi,), bool),
            "stream_index": np.full((bi,), -1, np.int64),
            "input_ids": np.full((q, t), self.tokenizer.pad_id, np.int32),
            "attention_mask": np.zeros((q, t), bool),
            "labels": np.full((q, t), IGNORE_INDEX, np.int32),
            "conv_image": block_first_rows(cfg.groups, bi, q),  # padding stays in its block
            "conv_valid": np.zeros((q,), bool),
            "masks": np.zeros((q, m, c, c), bool),
            "mask_valid": np.zeros((q, m), bool),
        }
        for row, r in enumerate(records):
            batch["pixels"][row] = r.pixels
            batch["resized_hw"][row] = r.resized_hw
            batch["original_hw"][row] = r.original_hw
            batch["mask_hw"][row] = r.mask_hw
            batch["image_valid"][row] = True
            batch["stream_index"][row] = r.stream_index
        for j, row, conv in slots:
            n, k = len(conv.input_ids), conv.masks.shape[0]
            batch["input_ids"][j, :n] = conv.input_ids
            batch["attention_mask"][j, :n] = True
            batch["labels"][j, :n] = conv.labels
            batch["conv_image"][j] = row
            batch["conv_valid"][j] = True
            batch["masks"][j, :k] = conv.masks
            batch["mask_valid"][j, :k] = True
        self.stats.samples += len(records)
        self.stats.conversations += len(slots)
        self.stats.batches += 1
        return batch
