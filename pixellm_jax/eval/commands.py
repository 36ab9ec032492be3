"""`pixellm eval` and `pixellm predict`: parsed arguments → a loaded model → files.

Both take an already-loaded model bundle (`loading.Loaded`); `load(args)` is the only place that reads
a checkpoint, so pointing it at another loader changes nothing else.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pixellm_jax.eval.batches import BatchShape, inference_shape
from pixellm_jax.eval.evaluate import EvalSettings, run_eval
from pixellm_jax.eval.generate import SamplingConfig
from pixellm_jax.eval.loading import Loaded, decoder, load_for_inference
from pixellm_jax.eval.predict import NothingPredicted, image_files, predict, write_prediction
from pixellm_jax.eval.runner import BatchRunner
from pixellm_jax.eval.splits import parse_split


def load(args: argparse.Namespace) -> Loaded:
    return load_for_inference(args.checkpoint, args.overrides)


def batch_shape(loaded: Loaded, runner: BatchRunner, args: argparse.Namespace) -> BatchShape:
    """Batch shapes from the config and the arguments, rounded up to whole devices."""
    return inference_shape(loaded.config, runner.local_devices, args.images_per_batch, args.rows_per_batch,
                           args.canvas_step)


def sampling(args: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)


def eval_command(args: argparse.Namespace, loaded: Loaded) -> dict:
    """Evaluate the named splits; writes metrics.json and per-sample JSONL into args.out."""
    splits = [parse_split(s, args.dataset_dir) for s in args.split]
    runner = BatchRunner(loaded.model)
    settings = EvalSettings(shape=batch_shape(loaded, runner, args), sampling=sampling(args), seed=args.seed,
                            num_points=args.num_points, judge=args.judge)
    metrics = run_eval(runner, loaded.legacy, decoder(loaded), splits, args.out, settings,
                       progress=not args.no_progress)
    print(json.dumps(metrics, indent=2))
    return metrics


def predict_command(args: argparse.Namespace, loaded: Loaded) -> None:
    """Answer the question about each image; print the answers, write overlays and masks into args.out.

    An unreadable image of a folder is reported on stderr ("<path>: skipped: <reason>") and the rest
    predicted, the skipped ones listed at the end; when no image could be predicted this raises
    `NothingPredicted` (`pixellm predict` exits 1, for a single image with its reason in one line).
    """
    runner = BatchRunner(loaded.model)
    paths = image_files(args.image)
    shape = batch_shape(loaded, runner, args)
    skipped: list[tuple[Path, str]] = []

    def on_skip(path: Path, reason: str) -> None:
        skipped.append((path, reason))
        if len(paths) > 1:
            print(f"{path}: skipped: {reason}", file=sys.stderr)

    for pred in predict(runner, loaded.legacy, decoder(loaded), paths, args.question, shape, sampling(args),
                        args.seed, on_skip):
        files = write_prediction(pred, args.out)
        print(f"{pred.image_path}: {pred.answer}")
        for k, f in enumerate(files[1:]):
            print(f"  [{k + 1}] {f}")
        print(f"  overlay {files[0]}")
    if not skipped:
        return
    if len(paths) == 1:
        raise NothingPredicted(skipped[0][1])  # the reason names the file
    summary = f"{len(skipped)} of {len(paths)} images skipped: {', '.join(p.name for p, _ in skipped)}"
    if len(skipped) == len(paths):
        raise NothingPredicted(f"no image could be predicted: {summary}")
    print(summary, file=sys.stderr)
