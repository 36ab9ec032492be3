"""The jitted train step: forward, loss and gradients of the trainable part, one optax update.

`jax.jit` with explicit shardings: the train state in and out in its layout (and donated, so the
update happens in place), the frozen part read-only in its layout, the batch as placed by
`mesh.global_batch`. Gradients are taken only with respect to the trainable parameters, so frozen
ones get neither gradients nor optimizer state. A micro-batch is rejected when its loss or gradient
norm is not finite, when its update is not (an update can overflow from a finite gradient: a huge
learning rate; so the parameters stay finite), or when the update is larger than
`train.max_update_ratio` times the parameters (global norms; 0 = no limit). A rejected micro-batch
changes nothing but the counters: parameters, optimizer state (including the gradient accumulator)
stay as they were, `nonfinite` counts the run of such batches and `skipped` all of them. So the state
a step returns is always finite.
Rematerialisation of the LLM layers follows `model.text.remat`; compute runs in `model.dtype`. The
forward is traced with the mesh in context, so the model's activation sharding constraints apply.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pixellm_jax.config import Config
from pixellm_jax.objective import pixellm_objective
from pixellm_jax.train.optimizer import warmup_decay_schedule
from pixellm_jax.train.state import StateLayout, TrainState

StepFn = Callable[[TrainState, nnx.State, dict], tuple[TrainState, dict]]


def loss_and_grads(graphdef: nnx.GraphDef, state: TrainState, frozen: nnx.State, batch: dict, cfg: Config,
                   image_groups: int = 1):
    """((loss, metrics, new rng streams), grads of the trainable parameters) for one micro-batch."""

    def loss_fn(params):
        model = nnx.merge(graphdef, params, state.rngs, frozen, copy=True)  # fresh Variables inside the trace
        loss, metrics, _ = pixellm_objective(model, batch, cfg.loss, deterministic=False, image_groups=image_groups)
        return loss, (metrics, nnx.state(model, nnx.RngState))

    (loss, (metrics, rngs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return (loss, metrics, rngs), grads


def make_train_step(
    layout: StateLayout, cfg: Config, tx: optax.GradientTransformation, mesh: Mesh, batch_shardings: dict,
    image_groups: int = 1,
) -> StepFn:
    """`step(state, frozen, batch) -> (state, metrics)`, compiled once per batch shape (token bucket).

    `image_groups`: the aligned blocks the global batch is packed in (`mesh.batch_groups`), which
    keeps each conversation's image gather on its own device.
    """
    schedule = warmup_decay_schedule(cfg.optim)

    def step(state: TrainState, frozen: nnx.State, batch: dict) -> tuple[TrainState, dict]:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # the model's activation constraints
            (loss, metrics, rngs), grads = loss_and_grads(layout.graphdef, state, frozen, batch, cfg, image_groups)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A finite update of finite parameters leaves them finite; its global norm squares the values, so
        # it also refuses updates large enough (~1e19) to overflow. (Reducing over the updated state
        # itself made XLA:CPU's compile 20x slower.)
        update_norm = optax.global_norm(updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
        extra = {}
        if cfg.train.max_update_ratio > 0:
            update_ratio = update_norm / jnp.maximum(optax.global_norm(state.params), 1e-12)
            finite &= update_ratio <= cfg.train.max_update_ratio
            extra["update_ratio"] = update_ratio.astype(jnp.float32)
        keep_new = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        nonfinite = jnp.where(finite, 0, state.nonfinite + 1)
        new_state = TrainState(
            step=state.step + 1,
            params=keep_new(params, state.params),
            opt_state=keep_new(opt_state, state.opt_state),
            rngs=rngs,
            nonfinite=nonfinite,
            skipped=state.skipped + (~finite).astype(jnp.int32),
        )
        metrics = {k: v.astype(jnp.float32) for k, v in metrics.items()}
        metrics.update(grad_norm=grad_norm, lr=schedule(state.opt_state.gradient_step),
                       finite=finite.astype(jnp.float32), **extra)
        return new_state, metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step,
        in_shardings=(layout.state_shardings, layout.frozen_shardings, batch_shardings),
        out_shardings=(layout.state_shardings, replicated),
        donate_argnums=(0,),
    )
