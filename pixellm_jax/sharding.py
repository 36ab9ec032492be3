"""Logical axis names and the rule table that maps them onto the device mesh.

Modules name the axes of every parameter logically (`embed`, `mlp`, `heads`, ...); this table alone
decides how those names land on the mesh axes `data`, `fsdp` and `tensor`, so sharding changes never
touch the modules.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated)
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    # activations (named apart from the weights: a weight's `embed` axis is FSDP-sharded, an
    # activation's hidden axis is not)
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "head_dim": None,
    # LLaMA
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "layers": None,
    "lora_rank": None,
    # CLIP and projectors
    "vision_embed": "fsdp",
    "vision_mlp": "tensor",
    "vision_heads": "tensor",
    "vision_positions": None,
    "patch": None,
    # pixel decoder: small, replicated
    "decoder_embed": None,
    "decoder_mlp": None,
    "decoder_tokens": None,
    "conv": None,
}


def logical_spec(axes: Sequence[str | None], rules: Mapping[str, object] = LOGICAL_RULES) -> PartitionSpec:
    """PartitionSpec for logical axis names; a mesh axis is used at most once per spec."""
    used: set[str] = set()
    out = []
    for name in axes:
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule (known: {sorted(rules)})")
        target = rules[name]
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        free = tuple(t for t in targets if t not in used)
        used.update(free)
        out.append(None if not free else free[0] if len(free) == 1 else free)
    return PartitionSpec(*out)


def constrain(x: jax.Array, axes: Sequence[str | None], rules: Mapping[str, object] = LOGICAL_RULES) -> jax.Array:
    """`x` constrained to the sharding its logical `axes` name, on the mesh in context.

    A no-op without a mesh in context (`jax.set_mesh`), so un-meshed eager and parity use is
    untouched. Mesh axes the context mesh lacks are dropped; a dimension whose mesh axes do not
    divide it is left unconstrained (XLA propagates its layout) rather than forced to replicate, which
    would all-gather it (a batch of 2 image blocks on 8 devices, a 32009-row vocabulary on tensor=4).
    A dimension named `None` (or by a replicated logical axis) is replicated.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_spec(axes, rules)
    fitted = []
    for dim, entry in zip(x.shape, tuple(spec) + (None,) * (x.ndim - len(spec))):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        names = tuple(n for n in names if n in mesh.shape)
        if not names:
            fitted.append(None)
        elif dim % math.prod(mesh.shape[n] for n in names):
            fitted.append(PartitionSpec.UNCONSTRAINED)
        else:
            fitted.append(names[0] if len(names) == 1 else names)
    if all(f is PartitionSpec.UNCONSTRAINED for f in fitted):
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*fitted)))


def logical_axes(state: nnx.State) -> nnx.State:
    """The logical axis names of every parameter in `state` (from its `out_sharding` metadata)."""

    def get(x):
        axes = x.get_metadata().get("out_sharding") if isinstance(x, nnx.Variable) else None
        return axes

    return jax.tree.map(get, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Mapping[str, object] = LOGICAL_RULES):
    """NamedSharding for every variable of `state`; variables without axis names are replicated.

    A mesh axis that does not divide a dimension is dropped for that dimension, so small tensors
    (norm scales, LoRA factors) stay replicated instead of failing.
    """

    def one(x):
        axes = x.get_metadata().get("out_sharding") if isinstance(x, nnx.Variable) else None
        shape = x.get_value().shape if isinstance(x, nnx.Variable) else ()
        if axes is None:
            return NamedSharding(mesh, PartitionSpec())
        spec = logical_spec(axes, rules)
        fitted = []
        for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
            names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
            size = 1
            for n in names:
                size *= mesh.shape[n]
            fitted.append(entry if size and dim % size == 0 else None)
        return NamedSharding(mesh, PartitionSpec(*fitted))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
