"""Training batches placed on the device mesh (`pixellm_jax.mesh`), sharded along data × fsdp.

Batches come from each process's input pipeline as host-local numpy arrays and become global
arrays: rows of process p follow those of process p − 1, and each conversation's `conv_image` index
is shifted by the images of the processes before it.
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXES = ("data", "fsdp")
# The batch keys the model and the objective read; the pipeline's bookkeeping keys stay on the host.
MODEL_KEYS = ("pixels", "resized_hw", "mask_hw", "input_ids", "attention_mask", "labels", "conv_image",
              "conv_valid", "masks", "mask_valid")


def batch_parallelism(mesh: Mesh) -> int:
    """How many ways the batch is split (data × fsdp)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_groups(mesh: Mesh, images: int, conversations: int) -> tuple[int, int]:
    """(blocks per process, blocks of the global batch) for per-process batches of `images` / `conversations`.

    A process packs its batch in one block per device of its share, each block holding its images and
    the conversations about them (`PipelineConfig.groups`), so the per-conversation image gather stays
    on the device (`models.grouped_take`); processes stack their blocks. (1, 1) when the batch split
    is not a whole number of devices per process; 1 block per process when its share does not split evenly.
    """
    parallel, processes = batch_parallelism(mesh), jax.process_count()
    if parallel % processes:
        return 1, 1
    local = parallel // processes
    local = local if images % local == 0 and conversations % local == 0 else 1
    return local, local * processes


def batch_sharding(mesh: Mesh, rows: int) -> NamedSharding:
    """Rows split over data × fsdp when they divide evenly, else replicated (single process only)."""
    if rows % batch_parallelism(mesh) == 0:
        return NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    if jax.process_count() > 1:
        raise ValueError(f"a global batch of {rows} rows cannot be split over data×fsdp = "
                         f"{batch_parallelism(mesh)} devices; make optim.micro_batch_size and "
                         "data.conversations_per_batch multiples of the per-process share")
    return NamedSharding(mesh, PartitionSpec())


IMAGE_KEYS = ("pixels", "resized_hw", "mask_hw")  # one row per image; the other keys: per conversation


def batch_shardings(mesh: Mesh, images: int, conversations: int) -> dict[str, NamedSharding]:
    """The sharding of each model key of a global batch of `images` / `conversations` rows."""
    return {k: batch_sharding(mesh, images if k in IMAGE_KEYS else conversations) for k in MODEL_KEYS}


def global_batch(local: Mapping[str, np.ndarray], shardings: Mapping[str, NamedSharding]) -> dict[str, jax.Array]:
    """This process's batch (pipeline schema) as global arrays with `shardings` (`batch_shardings`)."""
    count, index = jax.process_count(), jax.process_index()
    out = {}
    for key in MODEL_KEYS:
        value = np.asarray(local[key])
        if key == "conv_image" and count > 1:
            value = value + index * local["pixels"].shape[0]
        if count == 1:
            out[key] = jax.device_put(value, shardings[key])
        else:
            shape = (value.shape[0] * count,) + value.shape[1:]
            out[key] = jax.make_array_from_process_local_data(shardings[key], value, shape)
    return out
