"""The train state: trainable parameters, optimizer state, step, RNG streams, non-finite counters.

A `PixelLM` is split three ways: the trainable parameters (float32; they alone get gradients and
optimizer state), the dropout RNG streams (`nnx.RngState`, advanced by every step), and everything
else (frozen parameters in their storage dtype, buffers), which the step reads but never changes.
Each part is created directly into its sharding: `build_pixellm` runs inside a `jax.jit` whose
output shardings come from the parameters' logical axes, so no host ever holds the whole model.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from pixellm_jax.config import Config, ModelConfig
from pixellm_jax.models.trainable import build_pixellm, trainable_filter
from pixellm_jax.sharding import state_shardings


class TrainState(NamedTuple):
    """Everything a step changes (and a checkpoint stores besides the frozen part)."""

    step: jax.Array  # [] int32, micro-batches consumed (skipped ones included)
    params: nnx.State  # trainable parameters, float32
    opt_state: optax.OptState
    rngs: nnx.State  # dropout streams
    nonfinite: jax.Array  # [] int32, consecutive micro-batches skipped for a non-finite loss or gradient
    skipped: jax.Array  # [] int32, all skipped micro-batches


def train_filter(cfg: Config):
    """The parameters this run trains: PixelLM's official set, or all; either with the CLIP tower
    when `model.vision.trainable`."""
    def in_tower(path: tuple) -> bool:
        return bool(path) and str(path[0]) == "vision_tower"

    if cfg.train.trainable == "official":
        official = trainable_filter(cfg.model)
        if not cfg.model.vision.trainable:
            return official
        return lambda path, value: official(path, value) or (isinstance(value, nnx.Param) and in_tower(path))
    if cfg.model.vision.trainable:
        return nnx.Param
    return lambda path, value: isinstance(value, nnx.Param) and not in_tower(path)


def split_model(model: nnx.Module, cfg: Config):
    """(graphdef, trainable, rng streams, rest) of a PixelLM."""
    return nnx.split(model, train_filter(cfg), nnx.RngState, ...)


def variable_shardings(tree: Any, mesh: Mesh) -> Any:
    """Shardings with the structure of `tree`: each `nnx.Variable` holds its NamedSharding as value.

    Arrays outside Variables (optimizer counters, the step) are replicated.
    """
    shardings = state_shardings(tree, mesh)
    return jax.tree.map(
        lambda v, s: v.replace(s) if isinstance(v, nnx.Variable) else s,
        tree, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


class StateLayout(NamedTuple):
    """The static half of a run's state: how to rebuild the model and where each array lives."""

    graphdef: nnx.GraphDef
    abstract_state: TrainState  # ShapeDtypeStructs
    abstract_frozen: nnx.State
    state_shardings: TrainState
    frozen_shardings: nnx.State


def _float32(x):
    return x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x


def _fresh(model_cfg: ModelConfig, seed: int, cfg: Config, tx: optax.GradientTransformation):
    model = build_pixellm(model_cfg, seed)
    _, params, rngs, frozen = split_model(model, cfg)
    params = jax.tree.map(_float32, params)  # trained weights are float32 whatever their storage dtype
    zero = jnp.zeros((), jnp.int32)
    state = TrainState(step=zero, params=params, opt_state=tx.init(params), rngs=rngs, nonfinite=zero, skipped=zero)
    return state, frozen


def state_layout(cfg: Config, mesh: Mesh, tx: optax.GradientTransformation) -> StateLayout:
    """Shapes, dtypes and shardings of the train state and the frozen part, without allocating them."""
    graphdef, params, rngs, frozen = split_model(nnx.eval_shape(lambda: build_pixellm(cfg.model, cfg.seed)), cfg)
    params = jax.eval_shape(lambda p: jax.tree.map(_float32, p), params)
    zero = jax.ShapeDtypeStruct((), jnp.int32)
    state = TrainState(zero, params, jax.eval_shape(tx.init, params), rngs, zero, zero)
    return StateLayout(graphdef, state, frozen, variable_shardings(state, mesh), variable_shardings(frozen, mesh))




def init_state(cfg: Config, mesh: Mesh, tx: optax.GradientTransformation, layout: StateLayout | None = None):
    """(layout, state, frozen): a new run, every array created in its sharding.

    With `train.init_from` (a `pixellm convert` output, e.g. a LLaVA base or a released PixelLM), its
    weights replace the initial ones; the checkpoint must hold exactly the parameters of `model`
    (a mismatch is one error naming every differing path). Optimizer state starts fresh either way.
    """
    layout = layout or state_layout(cfg, mesh, tx)
    init = jax.jit(lambda: _fresh(cfg.model, cfg.seed, cfg, tx),
                   out_shardings=(layout.state_shardings, layout.frozen_shardings))
    state, frozen = init()
    if cfg.train.init_from:
        state, frozen = _with_pretrained(cfg, mesh, state, frozen)
    return layout, state, frozen


def _with_pretrained(cfg: Config, mesh: Mesh, state: TrainState, frozen: nnx.State):
    """`state` and `frozen` with every saved parameter taken from `train.init_from`."""
    from pixellm_jax.convert.checkpoint import restore_params
    from pixellm_jax.convert.stream import path_str

    weights = restore_params(cfg.train.init_from, cfg.model, mesh)

    def load(tree: nnx.State) -> nnx.State:
        flat = []
        for path, var in nnx.to_flat_state(tree):
            key = path_str(path)
            if key in weights:  # every Param and Buffer; RNG streams are not saved
                current = var.get_value()
                var = var.replace(weights.pop(key).astype(current.dtype))
            flat.append((path, var))
        return nnx.from_flat_state(flat)

    params = load(state.params)
    rest = load(frozen)
    if weights:  # restore_params checked the set against the model; nothing may be left unused
        raise ValueError(f"train.init_from: {sorted(weights)[:5]} ... were not placed in the train state")
    return state._replace(params=params), rest  # optimizer state (zeros) does not depend on the values


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying shardings (a restore target for Orbax)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
