"""Input-pipeline throughput against the training step it feeds, measured in the same run.

For a training config (default: the demo), this builds the run's tokenizer, its Grain pipeline
(mixture, shuffle, process share, synthetic scene rendering, preprocessing, llava_v1 tokenisation
with labels, mask canvas, fixed-shape batching) and its jitted train step on this host's devices.
It reports images/s of the pipeline per host (for each worker count asked for) and images/s the
train step consumes (global batch images / median step time, compile excluded); the ratio is
pipeline / consumption, target ≥ 3. The two are measured interleaved (`--rounds` rounds of
`--steps` train steps, then `--batches` batches of each pipeline row after `--warmup` untimed ones)
and medians are compared, with each round's paired ratio beside them; everything runs on the same
`--threads` CPUs and the load average before and after is in the JSON line (`tools/benchlib.py`).
Rows for other image sizes (e.g. the official 448 px) measure the pipeline alone, so a user can size
`data.num_workers` for an accelerator's step rate.

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

import benchlib  # noqa: E402  (tools/benchlib.py: the script's directory is on sys.path)


def run_config(name: str, overrides: list[str]):
    """(config with the tokenizer's codebook ids, transformers tokenizer, LegacyTokenizer)."""
    from pixellm_jax.config import load_config
    from pixellm_jax.train.data import load_tokenizer, with_tokenizer_ids

    out = Path(tempfile.mkdtemp(prefix="bench_data_"))
    cfg = load_config(name, [*overrides, f"train.output_dir={out}", "data.datasets=[synthetic]",
                             "data.sample_rates=[1.0]"])
    hf, tok = load_tokenizer(cfg, out)
    return with_tokenizer_ids(cfg, hf, tok), tok


def pipeline_runner(cfg, tok, workers: int, image_size: int | None = None):
    """(run(batches, warmup) -> (seconds, conversations), pipeline config) of one live pipeline iterator.

    Each call first draws `warmup` untimed batches (which also drains what worker processes
    prefetched while something else ran), then times `batches` batches.
    """
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

    def run(batches: int, warmup: int) -> tuple[float, int]:
        for _ in range(warmup):
            next(it)
        conversations = 0
        start = time.perf_counter()
        for _ in range(batches):
            conversations += int(next(it)["conv_valid"].sum())
        return time.perf_counter() - start, conversations

    return run, pc


def pipeline_rate(cfg, tok, workers: int, batches: int, warmup: int, image_size: int | None = None) -> dict:
    """Images/s and conversations/s of this host's training pipeline with `workers` processes."""
    run, pc = pipeline_runner(cfg, tok, workers, image_size)
    seconds, conversations = run(batches, warmup)
    return {"image_size": pc.image_size, "workers": workers, "images_per_s": batches * pc.images_per_batch / seconds,
            "conversations_per_s": conversations / seconds}


def step_runner(cfg, tok, steps: int):
    """(run(k) -> k step times, info) of the config's jitted train step, compiled and warmed up,
    with `steps` batches drawn from the training pipeline in advance."""
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
    queue = iter(batches[1:])

    def run(k: int) -> list[float]:
        nonlocal state
        times = []
        for _ in range(k):
            batch = next(queue)
            start = time.perf_counter()
            state, metrics = compiled(state, frozen, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        return times

    info = {"compile_seconds": compile_s, "images_per_step": pc.images_per_batch, "devices": jax.device_count()}
    return run, info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo", help="training config name or path")
    parser.add_argument("--override", nargs="*", default=[], help="section.field=value overrides")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="pipeline worker processes")
    parser.add_argument("--pipeline-only-sizes", type=int, nargs="*", default=[448],
                        help="image sizes measured for the pipeline alone")
    parser.add_argument("--batches", type=int, default=15, help="pipeline batches timed per row and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed pipeline batches before each timed block")
    parser.add_argument("--steps", type=int, default=4, help="train steps timed per round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds (train steps, then each pipeline row); medians over rounds")
    parser.add_argument("--threads", type=int, default=None, help="CPUs this process uses (default: all it may)")
    args = parser.parse_args(argv)
    pinned = benchlib.pin_threads(args.threads)  # before the first JAX computation
    load = benchlib.LoadRecord()
    load.warn()

    cfg, tok = run_config(args.config, args.override)
    step_run, info = step_runner(cfg, tok, args.steps * args.rounds)
    pipes = {w: pipeline_runner(cfg, tok, w) for w in args.workers}
    step_times, step_rounds = [], []
    blocks: dict[int, list[tuple[float, int]]] = {w: [] for w in args.workers}
    for _ in range(args.rounds):  # interleaved: load that comes and goes hits the step and the pipeline alike
        times = step_run(args.steps)
        step_times += times
        step_rounds.append(statistics.median(times))
        for w, (run, _) in pipes.items():
            blocks[w].append(run(args.batches, args.warmup))
    ipb = pipes[args.workers[0]][1].images_per_batch
    step_s = statistics.median(step_times)
    step = {"step_seconds": step_s, "compile_seconds": info["compile_seconds"],
            "images_per_step": info["images_per_step"], "images_per_s": info["images_per_step"] / step_s,
            "devices": info["devices"], "seconds": benchlib.summary(step_times)}
    rows = []
    for w, bl in blocks.items():
        image_rates = [args.batches * ipb / sec for sec, _ in bl]
        paired = [r / (info["images_per_step"] / sr) for r, sr in zip(image_rates, step_rounds)]
        rows.append({"image_size": pipes[w][1].image_size, "workers": w,
                     "images_per_s": statistics.median(image_rates),
                     "conversations_per_s": statistics.median([c / sec for sec, c in bl]),
                     "images_per_s_rounds": [round(r, 2) for r in image_rates],
                     "paired_ratio": {"min": round(min(paired), 2), "median": round(statistics.median(paired), 2),
                                      "max": round(max(paired), 2)}})
    extra = [pipeline_rate(cfg, tok, w, args.batches, args.warmup, size)
             for size in args.pipeline_only_sizes for w in args.workers]
    load.finish()
    best = max(rows, key=lambda r: r["images_per_s"])
    ratio = best["images_per_s"] / step["images_per_s"]

    print(f"input pipeline vs train step, config {args.config} ({rows[0]['image_size']} px, "
          f"{step['images_per_step']} images per step), {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()}; {pinned['threads']} used), {step['devices']} device(s); "
          f"{args.rounds} interleaved rounds, medians")
    print(f"train step: {step['step_seconds']:.3f} s median ({step['compile_seconds']:.1f} s compile) "
          f"-> consumes {step['images_per_s']:.1f} images/s")
    print(f"{'image_size':>10} {'workers':>7} {'images/s':>9} {'convs/s':>8} {'x step':>7} {'paired rounds':>14}")
    for r in rows + extra:
        x = f"{r['images_per_s'] / step['images_per_s']:>7.1f}" if r in rows else "      -"
        spread = (f"{r['paired_ratio']['min']:>6.1f}-{r['paired_ratio']['max']:<6.1f}" if r in rows else "")
        print(f"{r['image_size']:>10} {r['workers']:>7} {r['images_per_s']:>9.1f} {r['conversations_per_s']:>8.1f} {x} "
              f"{spread:>14}")
    verdict = "met" if ratio >= 3 else "MISSED"
    print(f"pipeline / train step = {ratio:.1f}x (target >= 3x: {verdict})")
    print(f"load average {load.before:.2f} before, {load.after:.2f} after")
    load.warn()
    result = {"bench": "data_pipeline", "config": args.config, "cpus": os.cpu_count(), "pinned": pinned,
              **load.as_dict(), "rounds": args.rounds, "train_step": step, "rows": rows, "pipeline_only": extra,
              "ratio_vs_train_step": ratio}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
