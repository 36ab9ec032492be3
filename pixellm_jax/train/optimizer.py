"""AdamW with the official schedule, global-norm clipping and gradient accumulation (optax).

Reference §5 (DeepSpeed `WarmupDecayLR`): the learning rate rises linearly from 0 to
`learning_rate` over `warmup_steps` optimizer steps, then falls linearly to 0 at `total_steps`.
Gradients are averaged over `grad_accum_steps` micro-batches (`optax.MultiSteps`), the average is
clipped to global norm `grad_clip`, then AdamW updates. The schedule counts optimizer steps.
"""

from __future__ import annotations

import optax

from pixellm_jax.config import OptimConfig


def warmup_decay_schedule(cfg: OptimConfig) -> optax.Schedule:
    """lr(n) = lr·n/warmup for n < warmup, then lr·(total − n)/(total − warmup), floored at 0."""
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    decay = optax.linear_schedule(cfg.learning_rate, 0.0, max(cfg.total_steps - cfg.warmup_steps, 1))
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def make_optimizer(cfg: OptimConfig) -> optax.MultiSteps:
    """The optimizer over the trainable parameters; its state counts micro-batches and steps."""
    inner = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(warmup_decay_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay),
    )
    return optax.MultiSteps(inner, every_k_schedule=cfg.grad_accum_steps)
