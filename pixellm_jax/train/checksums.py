"""Per-array checksums and finiteness of a train state, computed on the devices in one jitted call.

A checkpoint records the checksum of every array it holds; restoring recomputes them on the restored
arrays and compares, so bytes changed on disk (a bad sector, a half-copied file, random garbage in an
OCDBT store) are detected even when they still decode. The checksum is position-weighted over the raw
bits (any flipped bit, swapped element or shifted block changes it) and reduces each array where its
shards live, so no array is gathered to a host.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

_GOLDEN = 0x9E3779B1  # odd multipliers that spread the index and value bits over the word
_MIX = 0x85EBCA77


def _bits(x: jax.Array) -> jax.Array:
    """The array's raw bits as a flat uint32 vector (wider dtypes give two words per element)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = x.dtype.itemsize
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
    bits = lax.bitcast_convert_type(x, unsigned)
    return bits.reshape(-1).astype(jnp.uint32)


def _checksum(x: jax.Array) -> jax.Array:
    bits = _bits(x)
    index = lax.iota(jnp.uint32, bits.size)
    mixed = (bits ^ (index * jnp.uint32(_GOLDEN))) * jnp.uint32(_MIX)
    mixed = mixed ^ (mixed >> 15)
    return jnp.sum(mixed, dtype=jnp.uint32) ^ jnp.uint32(bits.size)


def _paths(tree: Any) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


@jax.jit
def _all_checksums(tree: Any) -> list[jax.Array]:
    return [_checksum(x) for x in jax.tree.leaves(tree)]


def checksums(tree: Any) -> dict[str, int]:
    """Path -> uint32 checksum of every array of `tree`."""
    values = jax.device_get(_all_checksums(tree))
    return {path: int(v) for path, v in zip(_paths(tree), values)}


def mismatches(tree: Any, recorded: dict[str, int]) -> list[str]:
    """The paths whose arrays do not have their recorded checksum (or that were not recorded)."""
    actual = checksums(tree)
    return [p for p, v in actual.items() if recorded.get(p) != v] + sorted(set(recorded) - set(actual))


def _is_float(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.inexact)


def all_finite_traced(tree: Any) -> jax.Array:
    """[] bool inside a trace: every floating-point value of `tree` is finite. `x * 0` is 0 for a
    finite x and NaN otherwise, so one float sum per array, added up, says it (the same shape of
    program as a global norm, which XLA compiles quickly; per-array boolean reductions did not)."""
    total = sum((jnp.sum(x * 0, dtype=jnp.float32) for x in jax.tree.leaves(tree) if _is_float(x)),
                jnp.float32(0))
    return jnp.isfinite(total)


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    return all_finite_traced(tree)


def all_finite(tree: Any) -> bool:
    """Whether every floating-point value of `tree` is finite."""
    return bool(_all_finite(tree))
