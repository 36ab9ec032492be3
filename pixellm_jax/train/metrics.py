"""Training metrics: JSON lines and TensorBoard event files, throughput and an MFU estimate.

Only process 0 writes. `metrics.jsonl` gets one strict-JSON object per log or eval event (tokens/s
counts the LLM positions of real tokens: text plus image tokens; a NaN/Inf value is null and named
in the record's "nonfinite" list); the TensorBoard events (`tb/`, written by tensorboardX, which
needs no TensorFlow) carry the same scalars.

MFU = model FLOPs per second / (devices × peak FLOPs per device). Model FLOPs per micro-batch are
estimated from the shapes, matmuls only: the LLM forward (2·params·tokens plus attention scores and
values, 4·layers·T²·hidden per sequence), its input-gradient backward (twice the forward) and the
weight gradients of its trainable matrices (2·trainable·tokens); the CLIP forward (frozen, no
backward). The pixel decoder is small and left out. Rematerialised recomputation is not counted.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax

from pixellm_jax.config import Config

# Dense bf16 peak FLOP/s per device, by a substring of `jax.Device.device_kind` (first match wins).
PEAK_FLOPS = (
    ("v6", 918e12),
    ("v5p", 459e12),
    ("v5", 197e12),  # v5e ("TPU v5 lite")
    ("v4", 275e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
)


def peak_flops(cfg: Config) -> float | None:
    """Peak FLOP/s of one device: `train.peak_tflops`, else from the device kind, else None."""
    if cfg.train.peak_tflops:
        return cfg.train.peak_tflops * 1e12
    kind = jax.devices()[0].device_kind
    return next((flops for key, flops in PEAK_FLOPS if key.lower() in kind.lower()), None)


def _llm_matmul_params(cfg: Config) -> tuple[int, int]:
    """(all, trainable) weights of the LLM that multiply every token (projections, MLP, lm_head)."""
    t = cfg.model.text
    kv = t.num_kv_heads * t.head_dim
    layer = 2 * t.hidden_size * t.hidden_size + 2 * t.hidden_size * kv + 3 * t.hidden_size * t.intermediate_size
    total = t.num_layers * layer + t.vocab_size * t.hidden_size
    if cfg.train.trainable == "all":
        return total, total
    lora = 0
    if cfg.model.lora.enabled:
        sizes = {"q_proj": (t.hidden_size, t.hidden_size), "k_proj": (t.hidden_size, kv),
                 "v_proj": (t.hidden_size, kv), "o_proj": (t.hidden_size, t.hidden_size),
                 "gate_proj": (t.hidden_size, t.intermediate_size), "up_proj": (t.hidden_size, t.intermediate_size),
                 "down_proj": (t.intermediate_size, t.hidden_size)}
        lora = t.num_layers * sum(cfg.model.lora.rank * (a + b) for a, b in (sizes[n] for n in cfg.model.lora.targets))
    return total + lora, t.vocab_size * t.hidden_size + lora


def step_flops(cfg: Config, images: int, conversations: int, text_len: int) -> float:
    """Estimated model FLOPs of one micro-batch of global shape (images, conversations, text_len)."""
    m = cfg.model
    t, v = m.text, m.vision
    seq = text_len + m.projector.llm_grid ** 2 - 1
    tokens = conversations * seq
    llm_all, llm_trainable = _llm_matmul_params(cfg)
    attention = 4 * t.num_layers * seq * seq * t.hidden_size * conversations
    forward = 2 * llm_all * tokens + attention
    backward = 2 * forward + 2 * llm_trainable * tokens
    patches = v.grid ** 2 + 1
    clip_layer = 4 * v.hidden_size * v.hidden_size + 2 * v.hidden_size * v.intermediate_size
    clip = images * (2 * v.num_layers * clip_layer * patches + 4 * v.num_layers * patches * patches * v.hidden_size)
    return float(forward + backward + clip)


class MetricsWriter:
    """JSON lines + TensorBoard scalars under `directory` (a no-op on processes other than 0)."""

    def __init__(self, directory: str | Path):
        self.active = jax.process_index() == 0
        self.directory = Path(directory)
        self._jsonl = None
        self._tb = None
        if self.active:
            from tensorboardX import SummaryWriter

            self.directory.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.directory / "metrics.jsonl", "a", buffering=1)
            self._tb = SummaryWriter(str(self.directory / "tb"))

    def write(self, step: int, scalars: dict[str, float], kind: str = "train") -> None:
        """One event: `kind/name` scalars at optimizer step `step`.

        The JSON line stays strict JSON: a NaN or infinite scalar is written as null and its name listed
        under "nonfinite" (TensorBoard gets the float itself).
        """
        if not self.active:
            return
        values = {k: float(v) for k, v in scalars.items()}
        nonfinite = [k for k, v in values.items() if not math.isfinite(v)]
        record = {"kind": kind, "step": step, "time": time.time(),
                  **{k: None if k in nonfinite else v for k, v in values.items()}}
        if nonfinite:
            record["nonfinite"] = nonfinite
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        for name, value in values.items():
            self._tb.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        if self.active:
            self._jsonl.close()
            self._tb.close()
