"""Input-pipeline throughput on the synthetic dataset: samples/s of the full Grain pipeline per host.

Runs the whole pipeline (mixture, shuffle, process share, synthetic scene rendering, preprocessing,
4.31-style tokenisation with labels, mask canvas, fixed-shape batching) for each image size and
worker count asked for, and prints a table plus one JSON line. The issue's target is ≥ 3× the
training step's consumption; the step is not measurable here yet, so the ratio is reported as null.

  python tools/bench_data.py                      # tiny tokenizer, 448 px (official) and 56 px (tiny)
  python tools/bench_data.py --tokenizer DIR --workers 0 2 4 --batches 50
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _tokenizer(directory: str | None, seg_token_num: int, scale_num: int):
    from transformers import AutoTokenizer

    from pixellm_jax.data.conversation import LegacyTokenizer
    from pixellm_jax.models.codebook import add_codebook_tokens

    if directory is None:
        from tests.tiny_tokenizer import build_tiny_tokenizer

        directory = build_tiny_tokenizer(tempfile.mkdtemp(prefix="bench_tok_"))
    hf = AutoTokenizer.from_pretrained(directory)
    add_codebook_tokens(hf, seg_token_num, scale_num)
    hf.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)
    return LegacyTokenizer.from_transformers(hf, seg_token_num, scale_num)


def _measure(tok, image_size: int, workers: int, args) -> dict:
    from pixellm_jax.data.pipeline import InputPipeline, PipelineConfig
    from pixellm_jax.data.synthetic import SyntheticShapes

    cfg = PipelineConfig(
        images_per_batch=args.images_per_batch,
        conversations_per_batch=args.images_per_batch * args.questions,
        image_size=image_size,
        mask_size=image_size,
        n_image_tokens=max(1, image_size // 28) ** 2,  # the official 16x16 grid at 448
        num_workers=workers,
        read_threads=args.threads,
        seed=0,
    )
    source = SyntheticShapes(num_samples=100_000, min_size=args.min_size, max_size=args.max_size,
                             questions_per_image=args.questions)
    pipe = InputPipeline([source], tok, cfg, process_index=0, process_count=1)
    it = iter(pipe)
    for _ in range(args.warmup):
        next(it)
    conversations = 0
    start = time.perf_counter()
    for _ in range(args.batches):
        conversations += int(next(it)["conv_valid"].sum())
    seconds = time.perf_counter() - start
    return {
        "image_size": image_size,
        "workers": workers,
        "samples_per_s": args.batches * cfg.images_per_batch / seconds,
        "conversations_per_s": conversations / seconds,
        "batches_per_s": args.batches / seconds,
        "dropped": dict(pipe.stats.dropped),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", help="LLaMA tokenizer directory (default: build the tiny test tokenizer)")
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[448, 56])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=1, help="read threads per process")
    parser.add_argument("--images-per-batch", type=int, default=2)
    parser.add_argument("--questions", type=int, default=2, help="questions per synthetic image")
    parser.add_argument("--min-size", type=int, default=64)
    parser.add_argument("--max-size", type=int, default=96)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batches", type=int, default=40)
    args = parser.parse_args(argv)

    tok = _tokenizer(args.tokenizer, 3, 2)
    rows = [_measure(tok, s, w, args) for s in args.image_sizes for w in args.workers]

    print(f"data pipeline throughput, synthetic {args.min_size}-{args.max_size} px scenes, "
          f"{args.images_per_batch} images x {args.questions} questions per batch, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()})")
    print(f"{'image_size':>10} {'workers':>7} {'samples/s':>10} {'convs/s':>9} {'batches/s':>9}")
    for r in rows:
        print(f"{r['image_size']:>10} {r['workers']:>7} {r['samples_per_s']:>10.1f} "
              f"{r['conversations_per_s']:>9.1f} {r['batches_per_s']:>9.2f}")
    print("training-step consumption: not measured yet (no train step); ratio = samples/s / step samples/s, "
          "target >= 3, left for later")
    best = max(rows, key=lambda r: r["samples_per_s"])
    print(json.dumps({
        "bench": "data_pipeline",
        "cpus": os.cpu_count(),
        "rows": rows,
        "best_samples_per_s": best["samples_per_s"],
        "train_step_samples_per_s": None,
        "ratio_vs_train_step": None,
    }))


if __name__ == "__main__":
    main()
