"""Evaluating dataset splits: batches → data-parallel model steps → metrics and per-sample records.

Each split is a random-access `Source` with a protocol:
* `teacher_forced` (refCOCO/+/g, multi-referring): the official `validate` — a forward pass with the
  reference answer, gIoU / cIoU over targets (`metrics.ReferringMeter`);
* `generate` (MUSE and other open answers): the official `ar_validate` — greedy (or sampled) answers
  with their masks, Hungarian-matched to the ground truths per question, both the corrected and the
  official-compatible MUSE metrics (`metrics.MuseMeter`); optionally the LLM-judge prompts.

Sources that know every annotated instance of an image (MUSE layout) also give, under either protocol,
`baseline_giou`: the mean IoU of predicting each target as the union of all of them ("mark
everything"), the floor a model must beat.

A sample the source rejects (`BadSample`) is skipped and counted by reason (`skipped_by_reason`,
keys of `sample.DROP_REASONS`). A split that scored no row has no metric (None) and fails the run
with `NothingScored`, after the metrics of every split are written.

Every process evaluates its share of the samples (sample i goes to process i mod P) on its devices;
the metric sums are added up over processes, and each process keeps the records of its samples. One
process on N devices computes exactly the rows one device does.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from pixellm_jax.data.conversation import LegacyTokenizer
from pixellm_jax.data.sample import DROP_REASONS, Source, bad_sample_category
from pixellm_jax.errors import UserError, writing
from pixellm_jax.eval.answer_text import number_placeholders, numbered_answer
from pixellm_jax.eval.batches import BatchShape, Protocol, eval_batches
from pixellm_jax.eval.generate import SamplingConfig
from pixellm_jax.eval.judge import judge_prompt, write_judge_prompts
from pixellm_jax.eval.metrics import (
    NUM_POINTS, MuseMeter, ReferringMeter, exact_iou, intersection_union, match_question,
)
from pixellm_jax.eval.runner import BatchRunner, agree_on_shapes, any_process, idle_batch, sampling_key
from pixellm_jax.eval.teacher_forced import score_referring

log = logging.getLogger(__name__)


class NothingScored(UserError, RuntimeError):
    """A split of which no sample could be scored (every one skipped, or none at all): it has no metric."""

    exit_code = 1  # the run failed, not its arguments


@dataclass
class Split:
    name: str
    source: Source
    protocol: Protocol


@dataclass
class EvalSettings:
    shape: BatchShape = field(default_factory=BatchShape)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int = 0  # sample questions, matching points and sampling keys derive from it
    num_points: int = NUM_POINTS
    judge: bool = False  # also build LLM-judge prompts for generated answers


class SplitResult(NamedTuple):
    metrics: dict
    records: list[dict]  # this process's per-row records, in sample order
    judge_prompts: list[tuple[str, str]]  # (record id, prompt), when settings.judge
    skipped: list[tuple[str, str]]  # this process's skipped samples: (sample id, BadSample reason)
    # the first `keep` generated rows of this process: (sample index, predicted masks [P, H, W] bool,
    # ground truths [G, H, W], record), for overlays
    kept: list[tuple[int, np.ndarray, np.ndarray, dict]] = []


def _summed(values: np.ndarray) -> np.ndarray:
    """Sum of a vector over processes."""
    if jax.process_count() == 1:
        return values
    return np.asarray(multihost_utils.process_allgather(values)).sum(axis=0)


def _row_batches(runner: BatchRunner, tok: LegacyTokenizer, split: Split, settings: EvalSettings, skipped, bar):
    """(batch, this process's outputs) for every step, the processes stepping together."""
    batches = eval_batches(split.source, tok, split.protocol, settings.shape, seed=settings.seed,
                           process_index=jax.process_index(), process_count=jax.process_count(),
                           skipped=skipped, progress=bar)
    step = 0
    while True:
        batch = next(batches, None)
        if not any_process(batch is not None):
            return
        batch = agree_on_shapes(batch if batch is not None else idle_batch(settings.shape, tok.pad_id), tok.pad_id)
        if split.protocol == "teacher_forced":
            out = runner.teacher_forced(batch)
        else:
            out = runner.generate(batch, settings.sampling, tok.eos_id, tok.pad_id, sampling_key(settings.seed, step))
        step += 1
        yield batch, out


def evaluate_split(
    runner: BatchRunner,
    tok: LegacyTokenizer,
    decode: Callable[[list[int]], str],
    split: Split,
    settings: EvalSettings,
    progress: bool = True,
    keep: int = 0,
) -> SplitResult:
    """Metrics (summed over processes) and this process's records (and its first `keep` generated rows'
    masks) for one split."""
    cfg = runner.cfg.head
    group = cfg.num_seg_tokens
    seg_ids = cfg.seg_ids(runner.cfg.text.vocab_size)
    referring, muse = ReferringMeter(), MuseMeter()
    records, prompts, skipped, kept = [], [], [], []
    # malformed answers, answers over max_targets, targets without prediction, and the mark-everything
    # baseline: IoU sum and targets
    counts = np.zeros(5)
    share = len(range(jax.process_index(), len(split.source), jax.process_count()))
    bar = tqdm(total=share, desc=split.name, unit="sample", disable=not progress)
    open_image = None
    for batch, out in _row_batches(runner, tok, split, settings, skipped, bar):
        for j, item in batch.placed():
            num_pred = int(min(out["num_targets"][j], cfg.max_targets))
            logits = out["mask_logits"][j, :num_pred, : item.gt.shape[1], : item.gt.shape[2]]
            record = {"split": split.name, "sample_id": item.sample_id, "conversation": item.conversation,
                      "question": item.question, "num_gt": int(item.gt.shape[0]), "num_pred": num_pred,
                      "malformed": bool(out["malformed"][j])}
            counts[0] += record["malformed"]
            if split.protocol == "teacher_forced":
                record["answer"] = number_placeholders(item.answer)
                record["targets"] = score_referring(item.gt, logits, num_pred, referring)
                counts[2] += max(item.gt.shape[0] - num_pred, 0)
            else:
                if open_image is not None and open_image != item.sample_index:
                    muse.close_image()
                open_image = item.sample_index
                tokens = out["tokens"][j, : out["lengths"][j]]
                answer, _ = numbered_answer(decode, tokens, seg_ids, group, tok.eos_id)
                match = match_question(logits, item.gt, settings.seed, (item.sample_index, item.conversation),
                                       settings.num_points)
                muse.add(match, num_pred, item.gt.shape[0])
                counts[1] += bool(out["overflow"][j])
                record.update(
                    answer=answer, reference_answer=number_placeholders(item.answer),
                    overflow=bool(out["overflow"][j]), generated_tokens=int(out["lengths"][j]),
                    pairs=[{"pred": c.pred, "gt": c.gt, "intersection": c.intersection, "union": c.union,
                            "iou": c.iou, "official_union": o.union, "official_iou": o.iou}
                           for c, o in zip(match.corrected, match.official)],
                )
                if len(kept) < keep:
                    kept.append((item.sample_index, logits > 0, item.gt, record))
                if settings.judge:
                    prompts.append((f"{split.name}/{item.sample_id}/{item.conversation}", judge_prompt(record, item.gt)))
            if item.scene is not None:
                for gt in item.gt:
                    counts[3:] += (exact_iou(*intersection_union(item.scene, gt)), 1)
            records.append(record)
    if open_image is not None:
        muse.close_image()
    bar.close()
    by_reason = [sum(bad_sample_category(reason) == key for _, reason in skipped) for key in DROP_REASONS]
    sizes = [len(records), len(skipped)]
    parts = [referring.sums(), muse.sums(), counts, sizes, np.asarray(by_reason, np.float64)]
    ref_sums, muse_sums, counts, sizes, by_reason = np.split(
        _summed(np.concatenate(parts)), np.cumsum([len(p) for p in parts])[:-1])
    metrics = {"protocol": split.protocol}
    if split.protocol == "teacher_forced":
        metrics.update(ReferringMeter.result(ref_sums))
        metrics["targets_without_prediction"] = int(counts[2])
    else:
        metrics.update(MuseMeter.result(muse_sums))
        metrics["overflow_answers"] = int(counts[1])
    # every target predicted as the union of the image's annotated instances (IoU = I / U)
    metrics["baseline_giou"] = counts[3] / counts[4] if counts[4] else None
    metrics.update(malformed_answers=int(counts[0]), rows=int(sizes[0]), skipped_samples=int(sizes[1]),
                   skipped_by_reason={key: int(n) for key, n in zip(DROP_REASONS, by_reason) if n})
    return SplitResult(metrics, records, prompts, skipped, kept)


def _nothing_scored(split: Split, result: SplitResult) -> str:
    """Why a split scored no row, in one line: how many samples were skipped, and the first one's reason."""
    total = len(split.source)
    if not total:
        return f"split {split.name}: no sample could be scored: the split has no samples"
    first = f" (first: {result.skipped[0][0]} {result.skipped[0][1]})" if result.skipped else ""
    return (f"split {split.name}: no sample could be scored: {result.metrics['skipped_samples']} of {total} "
            f"samples were skipped{first}")


def run_eval(
    runner: BatchRunner,
    tok: LegacyTokenizer,
    decode: Callable[[list[int]], str],
    splits: list[Split],
    out_dir: str | Path,
    settings: EvalSettings,
    progress: bool = True,
) -> dict[str, dict]:
    """Evaluate every split; write `metrics.json` (process 0), `<split>.samples.jsonl` and, when
    judging, `<split>.judge_prompts.jsonl` (with `.<process>` before `.jsonl` on multi-host runs).

    Raises `NothingScored` naming each split that scored no row, once everything is written; an
    output that cannot be written raises `errors.OutputError` naming it.
    """
    out_dir = Path(out_dir)
    with writing(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    suffix = f".{jax.process_index()}" if jax.process_count() > 1 else ""
    all_metrics, failures = {}, []
    for split in splits:
        result = evaluate_split(runner, tok, decode, split, settings, progress)
        all_metrics[split.name] = result.metrics
        samples = out_dir / f"{split.name}.samples{suffix}.jsonl"
        with writing(samples), open(samples, "w") as f:
            for record in result.records:
                f.write(json.dumps(record) + "\n")
        if settings.judge and split.protocol == "generate":
            prompts = out_dir / f"{split.name}.judge_prompts{suffix}.jsonl"
            with writing(prompts):
                write_judge_prompts(prompts, result.judge_prompts)
        log.info("%s: %s", split.name, json.dumps(result.metrics))
        if not result.metrics["rows"]:
            failures.append(_nothing_scored(split, result))
    if jax.process_index() == 0:
        tmp = out_dir / "metrics.json.tmp"
        with writing(out_dir / "metrics.json"):
            tmp.write_text(json.dumps(all_metrics, indent=2) + "\n")
            tmp.rename(out_dir / "metrics.json")
    if failures:
        raise NothingScored("; ".join(failures))
    return all_metrics
