"""The held-out splits a training run scores every `train.eval_every` steps, each by its protocol.

* `teacher_forced` (referring data, or any split with `protocol=teacher_forced`: the cheap variant for
  MUSE): one pass of training-shaped batches through the jitted validation step (`validation.py`):
  gIoU / cIoU on the mask canvas, validation loss and CE. This is also the built-in synthetic held-out
  set a run on `synthetic` uses when `data.val` is empty.
* `generate` (MUSE): what `pixellm eval` does — answers generated with the KV cache, Hungarian-matched
  masks at the original resolution, corrected gIoU / cIoU — on a replicated copy of the current model
  (`eval.runner.BatchRunner`); `max_new_tokens` is `data.model_max_length`.

Metrics are reported per split as `<split>/<metric>`; the first split's also without the prefix, so
`train.eval_metric: giou` picks the best checkpoint by it (or name one: `muse_val/giou`). What a
split's pass dropped is counted beside its metrics (`<split>/dropped`).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable

import jax
import numpy as np
from flax import nnx

from pixellm_jax.config import Config
from pixellm_jax.data.conversation import LegacyTokenizer
from pixellm_jax.data.pipeline import InputPipeline
from pixellm_jax.data.specs import parse_spec
from pixellm_jax.train.data import ValSplit, eval_pipeline, val_splits
from pixellm_jax.train.overlays import AnswerOverlay
from pixellm_jax.train.state import StateLayout, TrainState
from pixellm_jax.train.validation import evaluate


class NothingScoredInValidation(RuntimeError):
    """A held-out split of the run scored no target: its data or paths are wrong."""


@dataclasses.dataclass
class _Split:
    name: str
    protocol: str
    pipeline: InputPipeline | None = None  # teacher-forced
    split: ValSplit | None = None  # generated


def _padded(local: dict, length: int, pad_id: int) -> dict:
    """A batch padded on the text axis to `length` tokens (processes must agree on shapes)."""
    extra = length - local["input_ids"].shape[1]
    if extra <= 0:
        return local
    out = dict(local)
    out["input_ids"] = np.pad(local["input_ids"], ((0, 0), (0, extra)), constant_values=pad_id)
    out["attention_mask"] = np.pad(local["attention_mask"], ((0, 0), (0, extra)))
    out["labels"] = np.pad(local["labels"], ((0, 0), (0, extra)), constant_values=-100)
    return out


def _idle(local: dict) -> dict:
    """`local` with nothing valid: a process out of held-out data steps along with the others."""
    out = dict(local)
    for key in ("image_valid", "conv_valid", "mask_valid"):
        out[key] = np.zeros_like(local[key])
    return out


class HeldOut:
    """The run's held-out splits with their pipelines / runners, evaluated on the current state."""

    def __init__(self, cfg: Config, layout: StateLayout, tokenizer: LegacyTokenizer, hf_tokenizer,
                 local_groups: int):
        self.cfg, self.layout, self.tokenizer, self.hf_tokenizer = cfg, layout, tokenizer, hf_tokenizer
        self.splits: list[_Split] = []
        if cfg.train.eval_batches == 0:
            return
        if cfg.data.val:
            for s in val_splits(cfg):
                if s.protocol == "teacher_forced":
                    self.splits.append(_Split(s.name, s.protocol, eval_pipeline(cfg, tokenizer, local_groups, s.source)))
                else:
                    self.splits.append(_Split(s.name, s.protocol, split=s))
        elif any(parse_spec(spec).kind == "synthetic" for spec in cfg.data.datasets):
            self.splits.append(_Split("synthetic", "teacher_forced", eval_pipeline(cfg, tokenizer, local_groups)))

    def __bool__(self) -> bool:
        return bool(self.splits)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.splits]

    def evaluate(self, eval_step: Callable, state: TrainState, frozen, shardings: dict,
                 keep_predictions: int = 0) -> tuple[dict[str, float], list]:
        """Flat metrics of every split (first split's also unprefixed) and, for overlays, the first
        split's kept predictions: (batch, predictions) pairs of `keep_predictions` teacher-forced batches,
        or `AnswerOverlay`s of that many generated answers."""
        metrics: dict[str, float] = {}
        kept_all: list = []
        for i, s in enumerate(self.splits):
            keep = keep_predictions if i == 0 else 0
            if s.protocol == "teacher_forced":
                split_metrics, kept = self._teacher_forced(s, eval_step, state, frozen, shardings, keep)
            else:
                split_metrics, kept = self._generated(s, state, frozen, keep)
            kept_all += kept
            if not split_metrics.get("targets"):
                raise NothingScoredInValidation(
                    f"held-out split {s.name} ({s.protocol}) scored no target"
                    + (f": {split_metrics['dropped_detail']}" if split_metrics.get("dropped_detail") else ""))
            split_metrics.pop("dropped_detail", None)
            metrics.update({f"{s.name}/{k}": v for k, v in split_metrics.items()})
            if i == 0:
                metrics.update(split_metrics)
        return metrics, kept_all

    def _teacher_forced(self, s: _Split, eval_step, state, frozen, shardings, keep: int):
        pipeline, processes = s.pipeline, jax.process_count()
        longest = self.cfg.data.token_buckets[-1]

        def batches():
            it = iter(pipeline)
            last = None
            while True:
                local = next(it, None)
                if processes == 1:
                    if local is None:
                        return
                    yield local
                    continue
                from pixellm_jax.eval.runner import any_process

                if not any_process(local is not None):
                    return
                if local is None and last is None:  # this process had no held-out record at all
                    raise NothingScoredInValidation(
                        f"held-out split {s.name}: process {jax.process_index()} got no usable record")
                last = _padded(local, longest, self.tokenizer.pad_id) if local is not None else _idle(last)
                yield last

        before = collections.Counter(pipeline.stats.dropped)
        metrics, kept = evaluate(eval_step, state, frozen, batches(), shardings, keep)
        stats = pipeline.stats
        dropped = stats.dropped - before  # this pass's
        metrics["dropped"] = float(sum(dropped.values()))
        metrics.update({f"dropped/{reason}": float(n) for reason, n in sorted(dropped.items())})
        if dropped:
            metrics["dropped_detail"] = stats.dominant()
        return metrics, kept

    def _generated(self, s: _Split, state: TrainState, frozen, keep: int) -> tuple[dict[str, float], list]:
        from pixellm_jax.eval.batches import BatchShape
        from pixellm_jax.eval.evaluate import EvalSettings, Split, evaluate_split
        from pixellm_jax.eval.generate import SamplingConfig
        from pixellm_jax.eval.runner import BatchRunner

        cfg = self.cfg
        model = nnx.merge(self.layout.graphdef, state.params, state.rngs, frozen, copy=True)
        runner = BatchRunner(model)
        n = runner.local_devices
        shape = BatchShape(
            images=-(-cfg.optim.micro_batch_size // n) * n, rows=-(-cfg.data.conversations_per_batch // n) * n,
            groups=n, image_size=cfg.model.vision.image_size, normalization=cfg.data.normalization,
            token_buckets=tuple(cfg.data.token_buckets), use_im_start_end=cfg.data.use_im_start_end)
        settings = EvalSettings(shape=shape, sampling=SamplingConfig(max_new_tokens=cfg.data.model_max_length),
                                seed=cfg.seed)
        hf = self.hf_tokenizer
        decode = lambda ids: hf.decode([int(i) for i in ids], skip_special_tokens=False)  # noqa: E731
        source = s.split.source
        result = evaluate_split(runner, self.tokenizer, decode, Split(s.name, source, "generate"), settings,
                                progress=False, keep=keep)
        m = result.metrics
        corrected = m["corrected"]
        out = {"giou": corrected["giou"], "ciou": corrected["ciou"], "targets": float(m["ground_truths"]),
               "official_giou": m["official"]["giou"], "exact_targets": m["exact_targets"],
               "baseline_giou": m["baseline_giou"], "rows": float(m["rows"]),
               "dropped": float(m.get("skipped_samples", 0))}
        out.update({f"dropped/{reason}": float(n) for reason, n in m.get("skipped_by_reason", {}).items() if n})
        kept = [AnswerOverlay(source.get(index, np.random.default_rng(0)).image, preds, gt, r["question"],
                              r["answer"], r["reference_answer"], r["pairs"]) for index, preds, gt, r in result.kept]
        return {k: v for k, v in out.items() if v is not None}, kept

