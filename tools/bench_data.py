"""Input-pipeline throughput against the training step it feeds, measured in the same run.

For a training config (default: the demo), this builds the run's tokenizer, its Grain pipeline
(mixture, shuffle, process share, synthetic scene rendering, preprocessing, llava_v1 tokenisation
with labels, mask canvas, fixed-shape batching) and its jitted train step on this host's devices.
It reports images/s of the pipeline per host (for each worker count asked for) and images/s the
train step consumes (global batch images / median step time, compile excluded); the ratio is
pipeline / consumption, target ≥ 3. Rows for other image sizes (e.g. the official 448 px) measure
the pipeline alone, so a user can size `data.num_workers` for an accelerator's step rate.

  python tools/bench_data.py                                  # demo config: pipeline vs train step
  python tools/bench_data.py --workers 0 1 2 --pipeline-only-sizes 448
  python tools/bench_data.py --config tiny --override optim.micro_batch_size=4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run_config(name: str, overrides: list[str]):
    """(config with the tokenizer's codebook ids, transformers tokenizer, LegacyTokenizer)."""
    from pixellm_jax.config import load_config
    from pixellm_jax.train.data import load_tokenizer, with_tokenizer_ids

    out = Path(tempfile.mkdtemp(prefix="bench_data_"))
    cfg = load_config(name, [*overrides, f"train.output_dir={out}", "data.datasets=[synthetic]",
                             "data.sample_rates=[1.0]"])
    hf, tok = load_tokenizer(cfg, out)
    return with_tokenizer_ids(cfg, hf, tok), tok


def pipeline_rate(cfg, tok, workers: int, batches: int, warmup: int, image_size: int | None = None) -> dict:
    """Images/s and conversations/s of this host's training pipeline with `workers` processes."""
    from pixellm_jax.config import ConfigError
    from pixellm_jax.data.pipeline import InputPipeline, PipelineConfig
    from pixellm_jax.train.data import training_sources

    pc = dataclasses.replace(PipelineConfig.from_config(cfg), num_workers=workers)
    if image_size is not None:
        grid = max(1, image_size // 28)  # the official 16 x 16 LLM grid at 448 px
        pc = dataclasses.replace(pc, image_size=image_size, mask_size=image_size, n_image_tokens=grid * grid,
                                 model_max_length=pc.max_text_len + grid * grid - 1)  # same text budget
    sources, rates = training_sources(cfg)
    if not sources:
        raise ConfigError("data.datasets: nothing to read")
    it = iter(InputPipeline(sources, tok, pc, rates))
    for _ in range(warmup):
        next(it)
    conversations = 0
    start = time.perf_counter()
    for _ in range(batches):
        conversations += int(next(it)["conv_valid"].sum())
    seconds = time.perf_counter() - start
    return {"image_size": pc.image_size, "workers": workers, "images_per_s": batches * pc.images_per_batch / seconds,
            "conversations_per_s": conversations / seconds}


def step_rate(cfg, tok, steps: int) -> dict:
    """Images/s the config's jitted train step consumes on this host (median of `steps` steps)."""
    import jax

    from pixellm_jax.data.pipeline import PipelineConfig
    from pixellm_jax.mesh import make_mesh
    from pixellm_jax.train.data import training_pipeline
    from pixellm_jax.train.mesh import batch_groups, batch_shardings, global_batch
    from pixellm_jax.train.optimizer import make_optimizer
    from pixellm_jax.train.state import init_state
    from pixellm_jax.train.step import make_train_step

    pc = PipelineConfig.from_config(cfg)
    mesh = make_mesh(cfg.mesh)
    tx = make_optimizer(cfg.optim)
    layout, state, frozen = init_state(cfg, mesh, tx)
    shardings = batch_shardings(mesh, pc.images_per_batch, pc.conversations_per_batch)
    local_groups, groups = batch_groups(mesh, pc.images_per_batch, pc.conversations_per_batch)  # as the trainer
    step = make_train_step(layout, cfg, tx, mesh, shardings, groups)
    it = iter(training_pipeline(cfg, tok, local_groups))
    batches = [global_batch(next(it), shardings) for _ in range(steps + 1)]
    start = time.perf_counter()
    compiled = step.lower(state, frozen, batches[0]).compile()
    compile_s = time.perf_counter() - start
    state, metrics = compiled(state, frozen, batches[0])
    jax.block_until_ready(metrics)
    times = []
    for batch in batches[1:]:
        start = time.perf_counter()
        state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"step_seconds": seconds, "compile_seconds": compile_s, "images_per_step": pc.images_per_batch,
            "images_per_s": pc.images_per_batch / seconds, "devices": jax.device_count()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo", help="training config name or path")
    parser.add_argument("--override", nargs="*", default=[], help="section.field=value overrides")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="pipeline worker processes")
    parser.add_argument("--pipeline-only-sizes", type=int, nargs="*", default=[448],
                        help="image sizes measured for the pipeline alone")
    parser.add_argument("--batches", type=int, default=40, help="pipeline batches timed per row")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="train steps timed")
    args = parser.parse_args(argv)

    cfg, tok = run_config(args.config, args.override)
    step = step_rate(cfg, tok, args.steps)
    rows = [pipeline_rate(cfg, tok, w, args.batches, args.warmup) for w in args.workers]
    extra = [pipeline_rate(cfg, tok, w, args.batches, args.warmup, size)
             for size in args.pipeline_only_sizes for w in args.workers]
    best = max(rows, key=lambda r: r["images_per_s"])
    ratio = best["images_per_s"] / step["images_per_s"]

    print(f"input pipeline vs train step, config {args.config} ({rows[0]['image_size']} px, "
          f"{step['images_per_step']} images per step), {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()}), {step['devices']} device(s)")
    print(f"train step: {step['step_seconds']:.3f} s median ({step['compile_seconds']:.1f} s compile) "
          f"-> consumes {step['images_per_s']:.1f} images/s")
    print(f"{'image_size':>10} {'workers':>7} {'images/s':>9} {'convs/s':>8} {'x step':>7}")
    for r in rows + extra:
        x = f"{r['images_per_s'] / step['images_per_s']:>7.1f}" if r in rows else "      -"
        print(f"{r['image_size']:>10} {r['workers']:>7} {r['images_per_s']:>9.1f} {r['conversations_per_s']:>8.1f} {x}")
    verdict = "met" if ratio >= 3 else "MISSED"
    print(f"pipeline / train step = {ratio:.1f}x (target >= 3x: {verdict})")
    result = {"bench": "data_pipeline", "config": args.config, "cpus": os.cpu_count(), "train_step": step,
              "rows": rows, "pipeline_only": extra, "ratio_vs_train_step": ratio}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
