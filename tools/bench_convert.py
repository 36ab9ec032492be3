"""Benchmark `pixellm convert`: peak host memory and throughput on a generated multi-GB checkpoint.

Writes a PixelLM release (`hf_model/`: bf16 LLaMA + fp32 pixel modules as sharded `torch.save` files
with an index) and a small CLIP checkpoint into a temporary directory, sized by `--size-gb` (LLaMA
layers are added until the checkpoint reaches it), then measures, with the files evicted from the page
cache before each run:

* a plain sequential read of the same files (the reference),
* the streamed conversion: every source tensor read, transposed and cast into its file-backed
  parameter buffer, as `convert_checkpoint` does before writing (the issue's throughput target);
  these two alternate `--repeats` times and their medians are compared (with the spread and the
  per-round paired ratios, `tools/benchlib.py`), because a cold read's rate varies from run to run
  (on a VM the host may serve "evicted" pages from its own cache), and
* the whole conversion (`convert_checkpoint`: plan, streamed fill, Orbax write of the output).
The one-off XLA compilation of the initialisers is done first and reported separately.

Peak memory is RssAnon (anonymous memory; file-backed pages of memory-mapped checkpoints are
reclaimable and not counted), sampled every 5 ms, above the level before the conversion. Targets
(issue 4): peak <= 1.5 x largest tensor + 0.5 GB, throughput >= 0.5 x the plain read.

    python tools/bench_convert.py [--size-gb 2] [--hidden 2048] [--repeats 3] [--threads N] [--dir /tmp] [--keep]

Both sides run in this process on the same `--threads` CPUs. The load average before and after is
in the JSON line, with a warning when the machine was not idle at the start. Prints a table and one
JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

import benchlib  # tools/benchlib.py (the script's directory is on sys.path)

from pixellm_jax.config import from_dict, load_config, to_dict
from pixellm_jax.convert.checkpoint import target_specs
from pixellm_jax.convert.converter import convert_checkpoint, plan_conversion
from pixellm_jax.convert.exporters import export_entries, official_prompt_encoder_extras, release_config
from pixellm_jax.convert.importers import prepare_import
from pixellm_jax.convert.readers import to_torch
from pixellm_jax.convert.stream import fill_buffers, initial_values
from pixellm_jax.convert.tables import Table, clip_rules, pixellm_release_table, transforms_for

VISION = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4, patch_size=14,
              image_size=336, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakSampler:
    """Highest RssAnon seen by a background thread while active."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = rss_anon()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon())


def evict(paths) -> None:
    """Drop the files' pages from the page cache (after writing them back), so reads hit the disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def plain_read(paths, block: int = 64 << 20) -> float:
    buf = bytearray(block)
    view = memoryview(buf)
    start = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    return time.perf_counter() - start


def _rates(total: int, times: list[float]) -> str:
    return ", ".join(f"{total / t / 1e6:.0f}" for t in times)


def bench_config(hidden: int, layers: int):
    """pixellm_7b with a smaller LLaMA (sizes the checkpoint) and a small CLIP tower."""
    data = to_dict(load_config("pixellm_7b"))
    data["model"]["text"].update(hidden_size=hidden, intermediate_size=int(hidden * 2.6875) // 64 * 64,
                                 num_layers=layers, num_heads=hidden // 128, num_kv_heads=hidden // 128)
    data["model"]["vision"].update(hidden_size=VISION["hidden_size"], intermediate_size=VISION["intermediate_size"],
                                   num_layers=VISION["num_hidden_layers"], num_heads=VISION["num_attention_heads"],
                                   feature_layers=[-2, -1])
    return from_dict(data)


def _random(shape, dtype, rng) -> np.ndarray:
    return (rng.standard_normal(shape, np.float32) * 0.02).astype(dtype)


def write_release(root: Path, cfg, shard_bytes: int, seed: int = 0) -> tuple[list[Path], int]:
    """Random weights in the release layout (official dtypes); returns (files, largest tensor bytes)."""
    import torch

    specs = {p: jax.ShapeDtypeStruct(t.shape, t.dtype) for p, t in target_specs(cfg.model).items()}
    entries = export_entries(specs, pixellm_release_table(), transforms_for(cfg.model.vision),
                             lambda p: "not in the release" if p.startswith("vision_tower/") or "lora" in p else None)
    bf16 = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.", "model.mm_projector.",
            "model.out_mm_projector.")
    rng = np.random.default_rng(seed)
    hf_model = root / "hf_model"
    hf_model.mkdir(parents=True)
    shards: list[list[str]] = []
    current, size, largest = {}, 0, 0
    extras = official_prompt_encoder_extras(cfg.model.head.out_dim, seed)

    def flush():
        nonlocal current, size
        if current:
            torch.save(current, hf_model / f"part-{len(shards)}.bin")
            shards.append(list(current))
            current, size = {}, 0

    for e in entries + [type(entries[0])(k, value=v) for k, v in extras.items()]:
        shape, _ = e.shape_dtype(specs)
        dtype = ml_dtypes.bfloat16 if e.key.startswith(bf16) else np.float32
        value = e.value if e.value is not None else _random(shape, dtype, rng)
        if size + value.nbytes > shard_bytes:
            flush()
        current[e.key] = to_torch(value)
        size += value.nbytes
        largest = max(largest, value.nbytes)
    flush()
    weight_map = {}
    for i, keys in enumerate(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        (hf_model / f"part-{i}.bin").rename(hf_model / name)
        weight_map.update({k: name for k in keys})
    (hf_model / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (hf_model / "config.json").write_text(json.dumps(release_config(cfg, None)))
    v = cfg.model.text.vocab_size
    (hf_model / "added_tokens.json").write_text(json.dumps({f"[SEG{i}]": v - 6 + i for i in range(6)}))
    (hf_model / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))

    clip = root / "clip"
    clip.mkdir()
    from safetensors.torch import save_file

    clip_specs = {p: s for p, s in specs.items() if p.startswith("vision_tower/")}
    table = Table("CLIP", tuple(clip_rules("vision_model.")))
    tensors = {}
    for e in export_entries(clip_specs, table, transforms_for(cfg.model.vision), lambda p: None):
        shape, _ = e.shape_dtype(clip_specs)
        if e.key.endswith("position_embedding.weight"):  # the 336-px table, interpolated by the converter
            shape = ((VISION["image_size"] // VISION["patch_size"]) ** 2 + 1, shape[1])
        tensors[e.key] = to_torch(_random(shape, np.float32, rng))
    save_file(tensors, str(clip / "model.safetensors"), metadata={"format": "pt"})
    (clip / "config.json").write_text(json.dumps({"vision_config": VISION}))
    files = sorted(hf_model.glob("*.bin")) + [clip / "model.safetensors"]
    return files, largest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.0, help="approximate checkpoint size")
    parser.add_argument("--hidden", type=int, default=2048, help="LLaMA hidden size (layers fill the size)")
    parser.add_argument("--shard-gb", type=float, default=1.0, help="largest .bin shard")
    parser.add_argument("--dir", default=None, help="where to put the temporary files (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--repeats", type=int, default=3, help="plain read / streamed conversion pairs (medians)")
    parser.add_argument("--threads", type=int, default=None, help="CPUs this process uses (default: all it may)")
    args = parser.parse_args(argv)
    pinned = benchlib.pin_threads(args.threads)
    load = benchlib.LoadRecord()
    load.warn()

    h = args.hidden
    inter = int(h * 2.6875) // 64 * 64
    per_layer = (4 * h * h + 3 * h * inter) * 2
    fixed = 2 * 32009 * h * 2
    layers = max(1, round((args.size_gb * 1e9 - fixed) / per_layer))
    cfg = bench_config(h, layers)
    root = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.dir))
    try:
        t0 = time.perf_counter()
        files, largest = write_release(root / "src", cfg, int(args.shard_gb * 1e9))
        generated = time.perf_counter() - t0
        total = sum(f.stat().st_size for f in files)

        def open_release():  # fresh readers: pages mapped by earlier readers cannot be evicted
            spec = prepare_import("pixellm", root / "src", clip=root / "src" / "clip", base="pixellm_7b",
                                  overrides=["model.vision.feature_layers=[-2,-1]"])
            return spec, plan_conversion(spec)

        spec, plan = open_release()
        targets = target_specs(spec.config.model)
        t0 = time.perf_counter()
        initial = initial_values(spec.config.model, spec.config.seed, list(plan.initialised) + list(plan.partial))
        jax.block_until_ready(initial)
        compile_s = time.perf_counter() - t0
        del spec, plan

        # A cold read's rate varies from run to run (on a VM the host's cache may serve it), so the
        # read and the streamed conversion alternate and the medians are compared.
        read_times, stream_times, stream_peak = [], [], 0
        for _ in range(args.repeats):
            gc.collect()  # unmaps the previous readers' files
            evict(files)
            read_times.append(plain_read(files))
            spec, plan = open_release()
            evict(files)
            base = rss_anon()
            with PeakSampler() as sampler:  # read -> transform -> file-backed buffers, as convert does
                t0 = time.perf_counter()
                buffers = fill_buffers(plan, targets, initial, buffer_dir=root / "buffers")
                stream_times.append(time.perf_counter() - t0)
            del spec, plan, buffers
            shutil.rmtree(root / "buffers")
            stream_peak = max(stream_peak, sampler.peak - base)
        read_s, stream_s = statistics.median(read_times), statistics.median(stream_times)

        gc.collect()
        spec, _ = open_release()
        evict(files)
        base = rss_anon()
        with PeakSampler() as peak:  # the whole conversion, Orbax write included
            t0 = time.perf_counter()
            convert_checkpoint(spec, root / "out")
            convert_s = time.perf_counter() - t0
        out_bytes = sum(f.stat().st_size for f in (root / "out").rglob("*") if f.is_file())
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    load.finish()
    extra = max(peak.peak - base, stream_peak)
    budget = 1.5 * largest + 0.5e9
    ratio = read_s / stream_s
    paired = benchlib.ratio(stream_times, read_times)  # stream time / read time = read rate / stream rate
    rows = [
        ("checkpoint", f"{total / 1e9:.2f} GB in {len(files)} files ({layers} LLaMA layers, hidden {h}), "
                       f"generated in {generated:.0f} s"),
        ("largest tensor", f"{largest / 1e6:.0f} MB"),
        ("plain sequential read", f"{read_s:.2f} s = {total / read_s / 1e6:.0f} MB/s (median of "
                                  f"{_rates(total, read_times)} MB/s)"),
        ("streamed conversion", f"{stream_s:.2f} s = {total / stream_s / 1e6:.0f} MB/s (median of "
                                f"{_rates(total, stream_times)} MB/s; read, transpose, cast into file-backed buffers)"),
        ("throughput ratio", f"{ratio:.2f} of the plain read (target >= 0.5; paired rounds "
                             f"{1 / paired['paired_max']:.2f}-{1 / paired['paired_min']:.2f})"),
        ("whole conversion", f"{convert_s:.2f} s = {total / convert_s / 1e6:.0f} MB/s (+ Orbax write of "
                             f"{out_bytes / 1e9:.2f} GB; initialiser compile {compile_s:.1f} s before, not counted)"),
        ("peak RssAnon", f"{extra / 1e6:.0f} MB above the start = {extra / largest:.2f} x largest tensor "
                         f"(target <= {budget / 1e6:.0f} MB)"),
        ("machine", f"{os.cpu_count()} CPUs ({pinned['threads']} used), load average {load.before:.2f} before, "
                    f"{load.after:.2f} after" + ("" if load.idle else " (NOT idle at the start)")),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(json.dumps({
        "bytes": total, "files": len(files), "largest_tensor_bytes": largest, "read_s": round(read_s, 3),
        "stream_s": round(stream_s, 3), "convert_s": round(convert_s, 3),
        "read_times": [round(t, 3) for t in read_times], "stream_times": [round(t, 3) for t in stream_times],
        "read_mb_s": round(total / read_s / 1e6, 1), "stream_mb_s": round(total / stream_s / 1e6, 1),
        "convert_mb_s": round(total / convert_s / 1e6, 1), "throughput_ratio": round(ratio, 3),
        "peak_rss_anon_extra_bytes": extra, "peak_budget_bytes": int(budget),
        "meets_memory_target": extra <= budget, "meets_throughput_target": ratio >= 0.5,
        "read_seconds": benchlib.summary(read_times), "stream_seconds": benchlib.summary(stream_times),
        "paired_throughput_ratios": {"min": round(1 / paired["paired_max"], 3),
                                     "median": round(1 / paired["paired_median"], 3),
                                     "max": round(1 / paired["paired_min"], 3)},
        "init_compile_s": round(compile_s, 2), "cpus": os.cpu_count(), "pinned": pinned,
        "load_average": round(load.before, 2), **load.as_dict(),
    }))
    load.warn()
    return 0


if __name__ == "__main__":
    sys.exit(main())
