"""`pixellm describe`: what a config builds, measured without allocating it.

Counts every parameter of the model abstractly (`nnx.eval_shape`), per component, with the
trainable/frozen split and storage bytes; with `--run-tiny` it also initialises a small config and
runs one jitted forward + loss on a random batch to show every part working together.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixellm_jax.config import Config, load_config
from pixellm_jax.models.lora import LoRAParam
from pixellm_jax.models.trainable import build_pixellm
from pixellm_jax.objective import pixellm_objective
from pixellm_jax.tokens import IMAGE_TOKEN
from pixellm_jax.train.state import train_filter


def parameter_table(cfg: Config) -> list[tuple[str, int, int, int]]:
    """(component, parameters, trainable, bytes) per top-level module, from abstract shapes; trainable
    as the run trains them (`train.trainable`, `model.vision.trainable`)."""
    model = nnx.eval_shape(lambda: build_pixellm(cfg.model))
    trainable = train_filter(cfg)
    rows: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = str(path[0]) if path[0] != "llm" else f"llm.{path[1]}"
        if isinstance(var, LoRAParam):
            name = "llm.lora"
        shape = var.get_value()
        n = math.prod(shape.shape)
        rows[name][0] += n
        rows[name][1] += n if trainable(path, var) else 0
        rows[name][2] += n * shape.dtype.itemsize
    return [(k, *v) for k, v in rows.items()]


def _fmt(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def random_batch(cfg: Config, conversations: int = 2, length: int = 32, canvas: int = 32, seed: int = 0) -> dict:
    """A batch in the training schema with random pixels and tokens and one target per conversation."""
    rng = np.random.default_rng(seed)
    mc = cfg.model
    s, m = mc.vision.image_size, mc.head.max_targets
    seg = list(mc.head.seg_ids(mc.text.vocab_size))
    ids = rng.integers(3, min(mc.text.vocab_size, 32000) - len(seg), size=(conversations, length)).astype(np.int32)
    ids[:, 0], ids[:, 1] = 1, IMAGE_TOKEN
    ids[:, length - len(seg) - 2: length - 2] = seg
    labels = np.where(np.arange(length)[None] > length // 2, ids, -100).astype(np.int32)
    masks = np.zeros((conversations, m, canvas, canvas), bool)
    masks[:, 0, canvas // 4: canvas // 2, canvas // 4: 3 * canvas // 4] = True
    mask_valid = np.zeros((conversations, m), bool)
    mask_valid[:, 0] = True
    return dict(
        pixels=rng.normal(size=(conversations, s, s, 3)).astype(np.float32),
        resized_hw=np.full((conversations, 2), s, np.int32), mask_hw=np.full((conversations, 2), canvas, np.int32),
        input_ids=ids, attention_mask=np.ones_like(ids, bool), labels=labels,
        conv_image=np.arange(conversations, dtype=np.int32), conv_valid=np.ones(conversations, bool),
        masks=masks, mask_valid=mask_valid,
    )


def describe(config: str, overrides: list[str], run_tiny: str | None = None) -> None:
    cfg = load_config(config, overrides)
    print(f"config {cfg.name}: mode={cfg.mode}, LLM {cfg.model.text.num_layers}x{cfg.model.text.hidden_size}, "
          f"CLIP {cfg.model.vision.num_layers}x{cfg.model.vision.hidden_size} at {cfg.model.vision.image_size}px, "
          f"codebook N={cfg.model.head.seg_token_num} L={cfg.model.head.scale_num}")
    rows = parameter_table(cfg)
    print(f"{'component':<24}{'parameters':>14}{'trainable':>14}{'storage':>12}")
    for name, n, t, b in rows:
        print(f"{name:<24}{_fmt(n):>14}{_fmt(t):>14}{b / 2**30:>10.2f}GiB")
    n, t, b = (sum(r[i] for r in rows) for i in (1, 2, 3))
    print(f"{'total':<24}{_fmt(n):>14}{_fmt(t):>14}{b / 2**30:>10.2f}GiB")
    if run_tiny:
        small = load_config(run_tiny)
        start = time.perf_counter()
        model = build_pixellm(small.model, seed=small.seed)
        batch = jax.tree.map(jnp.asarray, random_batch(small))
        forward = nnx.jit(lambda m, b: pixellm_objective(m, b, small.loss)[1:])
        metrics, out = forward(model, batch)
        jax.block_until_ready(metrics)
        print(f"\n{small.name}: one jitted forward + loss on a random batch (untrained weights) "
              f"in {time.perf_counter() - start:.1f}s")
        print(f"  text logits {tuple(out.logits.shape)}, mask logits {tuple(out.mask_logits.shape)}, "
              f"targets per conversation {np.asarray(out.seg.num_targets).tolist()}")
        print("  " + ", ".join(f"{k}={float(v):.4f}" for k, v in metrics.items()))
