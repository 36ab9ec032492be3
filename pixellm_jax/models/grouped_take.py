"""Per-conversation image rows, taken within batch groups so a sharded batch needs no all-gather.

Every conversation (and every target) reads the features of its image: `x[index]`. With the batch
split over data × fsdp, XLA cannot know that a conversation's image lives on its own device, so a
plain gather all-gathers the image features of the whole global batch (7B on 256 devices: 2.1 GB
per feature map and per gradient). The input pipeline packs each batch as `groups` aligned blocks
(`data/blocks.py`; block g: images [g·B/G, (g+1)·B/G), conversations [g·Q/G, (g+1)·Q/G), each
conversation's image in its own block), so the gather is done per block, batched over the block
axis, which is sharded.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pixellm_jax.sharding import constrain, logical_spec


def take_in_groups(x: jax.Array, index: jax.Array, groups: int = 1) -> jax.Array:
    """x[index] along axis 0 (indices clipped), with rows and indices in `groups` aligned blocks.

    index: [n] int rows of x. With groups > 1, x's rows and the indices split into `groups` equal
    blocks and index entries of block g must point into x's block g (the pipeline's packing); an
    entry outside its block is clipped into it. groups = 1 is a plain `jnp.take`.
    """
    if groups == 1:
        return jnp.take(x, index, axis=0, mode="clip")
    rows, n = x.shape[0], index.shape[0]
    if rows % groups or n % groups:
        raise ValueError(f"{rows} rows and {n} indices do not split into {groups} equal groups")
    per = rows // groups
    blocks = _blocks_on_batch_axes(x.reshape(groups, per, *x.shape[1:]))
    local = index.reshape(groups, n // groups) - (jnp.arange(groups, dtype=index.dtype) * per)[:, None]
    out = jax.vmap(lambda xb, ib: jnp.take(xb, ib, axis=0, mode="clip"))(blocks, _blocks_on_batch_axes(local))
    return _blocks_on_batch_axes(out).reshape(n, *x.shape[1:])


def _blocks_on_batch_axes(x: jax.Array) -> jax.Array:
    """Blocks [G, ...] split over the batch's mesh axes when G divides by them. Otherwise a block
    spans devices and nothing is constrained (keeping a block's rows whole would all-gather them)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    axes = logical_spec(("batch",))[0]
    split = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes) if a in mesh.shape)
    return constrain(x, ("batch",)) if x.shape[0] % split == 0 else x
