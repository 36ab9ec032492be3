"""The fastest any implementation could generate on this machine: measured ceilings and the work of a call.

Greedy generation at fp32 is bounded by two rates of the machine: the rate memory streams into the
cores (each decode step reads every LLM weight and the KV cache once) and the matmul rate (prefill,
and decode at large batch). `measure_machine` measures both in this process, on the threads it was
pinned to, with XLA, PyTorch and NumPy, and keeps the best of each (the machine's ceiling is what
its best library reaches, not ours); `generation_bound` turns them and the model's shapes into the
least time one `generate` call can take. A speedup target against another implementation is only
reachable where that implementation is slower than the bound by the target's factor.
"""

from __future__ import annotations

import time

STREAM_BYTES = 1 << 30  # 1 GiB: far above any last-level cache
MATMUL_SIZE = 2048


def _best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_machine(repeats: int = 5, stream_bytes: int = STREAM_BYTES, matmul_size: int = MATMUL_SIZE) -> dict:
    """Read bandwidth (GB/s, a sum over `stream_bytes`) and fp32 matmul rate (GFLOP/s, square
    `matmul_size`), each by XLA, PyTorch and NumPy, best of `repeats`; `best_*` the max of the three."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    n = stream_bytes // 4
    host = np.full(n, 0.5, np.float32)
    dev, ten = jnp.asarray(host), torch.from_numpy(host)
    xla_sum = jax.jit(jnp.sum)
    read = {
        "xla": stream_bytes / _best_of(lambda: xla_sum(dev).block_until_ready(), repeats) / 1e9,
        "torch": stream_bytes / _best_of(lambda: ten.sum(), repeats) / 1e9,
        "numpy": stream_bytes / _best_of(lambda: host.sum(), repeats) / 1e9,
    }
    del host, dev, ten
    m = matmul_size
    a = np.random.default_rng(1).random((m, m), dtype=np.float32)
    ja, ta = jnp.asarray(a), torch.from_numpy(a)
    xla_dot = jax.jit(jnp.dot)
    flops = 2 * m ** 3
    dot = {
        "xla": flops / _best_of(lambda: xla_dot(ja, ja).block_until_ready(), repeats) / 1e9,
        "torch": flops / _best_of(lambda: torch.mm(ta, ta), repeats) / 1e9,
        "numpy": flops / _best_of(lambda: a @ a, repeats) / 1e9,
    }
    return {"read_gb_s": {k: round(v, 1) for k, v in read.items()},
            "matmul_gflop_s": {k: round(v, 1) for k, v in dot.items()},
            "best_read_gb_s": round(max(read.values()), 1), "best_matmul_gflop_s": round(max(dot.values()), 1)}


def llm_shapes(text) -> dict:
    """Parameter counts of a LLaMA config (`cfg.model.text`): per layer and the vocabulary projection."""
    h, f, heads, kv = text.hidden_size, text.intermediate_size, text.num_heads, text.num_kv_heads
    head_dim = h // heads
    per_layer = h * head_dim * (heads + 2 * kv) + heads * head_dim * h + 3 * h * f + 2 * h
    return {"layer_params": per_layer, "layers": text.num_layers, "lm_head_params": h * text.vocab_size,
            "kv_per_token": 2 * text.num_layers * kv * head_dim, "hidden": h}


def generation_bound(text, batch: int, prompt_tokens: int, new_tokens: int, machine: dict,
                     bytes_per_value: int = 4) -> dict:
    """Least seconds for prefill of `prompt_tokens` and `new_tokens - 1` cached steps of `batch` rows.

    Prefill: its matmul FLOPs at the best matmul rate. Each step: the larger of (all weights plus the
    cache read once, at the best read bandwidth) and (its FLOPs at the matmul rate). Attention FLOPs
    and every elementwise op are left out, so the bound is below what is reachable, never above."""
    s = llm_shapes(text)
    weights = s["layers"] * s["layer_params"] + s["lm_head_params"]
    bw, peak = machine["best_read_gb_s"] * 1e9, machine["best_matmul_gflop_s"] * 1e9
    prefill = 2 * weights * batch * prompt_tokens / peak
    decode = 0.0
    for step in range(new_tokens - 1):
        cached = prompt_tokens + step
        traffic = (weights + batch * cached * s["kv_per_token"]) * bytes_per_value
        decode += max(traffic / bw, 2 * weights * batch / peak)
    return {"weights_mb": round(weights * bytes_per_value / 1e6, 1), "prefill_s": round(prefill, 4),
            "decode_s": round(decode, 4), "total_s": round(prefill + decode, 4)}


def against(bound: dict, ours_s: float, other_s: float) -> dict:
    """Where two measured medians stand against the bound: our share of it and the largest possible ratio."""
    return {"ours_of_bound": round(bound["total_s"] / ours_s, 3),
            "max_speedup_vs_other": round(other_s / bound["total_s"], 2)}
