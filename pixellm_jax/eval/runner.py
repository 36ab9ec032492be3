"""Running evaluation batches data-parallel on a 1-D mesh of all devices (and hosts).

The model's state is replicated on every device; each batch array is sharded along its first axis
(`data`), so every device runs its share of images and rows, and the outputs come back sharded the
same way. Each process passes its own rows (`host_local_array_to_global_array`) and gets its own
rows back, so a multi-host run is the union of per-process runs, and a run on N devices computes
the same rows as one device does. Batch sizes per process must be multiples of its device count.
A batch packed in blocks (`BatchShape.groups`, one per local device) gathers each row's image
features on its own device: the steps get the global block count, `groups` × processes.

Programs are compiled once per batch shape: (rows, T, out_hw) for the teacher-forced forward, plus
the sampling settings for generation.

The steps are plain `jax.jit` functions of the model's graph definition (static) and its state, split
once when the runner is made: an `nnx.jit` call would walk the model's graph on every batch (tens of
ms for a PixelLM) and, returning every variable as an updated output, copy all the weights on every
call (a full copy of a 7B model per batch).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pixellm_jax.data.blocks import block_first_rows
from pixellm_jax.eval.batches import BatchShape, EvalBatch
from pixellm_jax.eval.generate import SamplingConfig, generate
from pixellm_jax.eval.teacher_forced import teacher_forced_outputs
from pixellm_jax.models.pixellm import PixelLM
from pixellm_jax.postprocess import target_masks
from pixellm_jax.tokens import IMAGE_TOKEN

ROWS = PartitionSpec("data")


class StaticGraph:
    """A model's `nnx.GraphDef` as a static `jax.jit` argument: hashed by its repr (computed once; the
    graph holds the model's config, whose list fields make the GraphDef itself unhashable) and
    compared by value, so equal models share compiled programs."""

    def __init__(self, graphdef: nnx.GraphDef):
        self.graphdef = graphdef
        self._hash = hash(repr(graphdef))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, StaticGraph) and (self is other or self.graphdef == other.graphdef)

    def merge(self, state: nnx.State):
        return nnx.merge(self.graphdef, state)


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh named `data` over `devices` (default: all devices of all processes)."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), ("data",))


def _rows(tree: dict, mesh: Mesh) -> dict:
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, ROWS)), tree)


@functools.partial(jax.jit, static_argnames=("graphdef", "out_hw", "mesh", "image_groups"))
def _teacher_forced_step(graphdef: StaticGraph, state: nnx.State, arrays: dict, out_hw: tuple[int, int], mesh: Mesh,
                         image_groups: int) -> dict:
    model: PixelLM = graphdef.merge(state)
    return _rows(teacher_forced_outputs(model, arrays, out_hw, image_groups), mesh)


@functools.partial(jax.jit, static_argnames=("graphdef", "out_hw", "sampling", "eos_id", "pad_id", "mesh",
                                             "image_groups"))
def _generate_step(graphdef: StaticGraph, state: nnx.State, arrays: dict, key: jax.Array, out_hw: tuple[int, int],
                   sampling: SamplingConfig, eos_id: int, pad_id: int, mesh: Mesh, image_groups: int) -> dict:
    model: PixelLM = graphdef.merge(state)
    out = generate(model, arrays["pixels"], arrays["resized_hw"], arrays["input_ids"], arrays["attention_mask"],
                   arrays["conv_image"], eos_id=eos_id, pad_id=pad_id, sampling=sampling, key=key,
                   image_groups=image_groups)
    return _rows({
        "tokens": out.tokens,
        "lengths": out.lengths,
        "mask_logits": target_masks(out.mask_logits, arrays["resized_hw"], arrays["original_hw"],
                                    arrays["conv_image"], out_hw, model.cfg.vision.image_size, image_groups)[0],
        "num_targets": out.seg.num_targets,
        "malformed": out.seg.malformed,
        "overflow": out.seg.overflow,
    }, mesh)


class BatchRunner:
    """A replicated copy of a model on a data mesh, with jitted teacher-forced and generation steps.

    The steps are module-level `jax.jit` functions of (graph definition, state), so runners of
    equally shaped models share their compiled programs.
    """

    def __init__(self, model: PixelLM, mesh: Mesh | None = None):
        self.mesh = data_mesh() if mesh is None else mesh
        if self.mesh.axis_names != ("data",):
            raise ValueError(f"evaluation needs a 1-D mesh with axis 'data', got axes {self.mesh.axis_names}")
        self.cfg = model.cfg
        graphdef, state = nnx.split(model)
        self.graphdef = StaticGraph(graphdef)
        self.state = jax.device_put(state, NamedSharding(self.mesh, PartitionSpec()))
        self.model = self.graphdef.merge(self.state)

    @property
    def local_devices(self) -> int:
        """Devices of the mesh in this process: per-process batch sizes must be multiples of it."""
        return sum(d.process_index == jax.process_index() for d in self.mesh.devices.flat)

    def _global(self, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        for name, a in arrays.items():
            if a.shape[0] % self.local_devices:
                raise ValueError(f"batch array {name} has {a.shape[0]} rows, not a multiple of the "
                                 f"{self.local_devices} local devices")
        return multihost_utils.host_local_array_to_global_array(arrays, self.mesh, ROWS)

    def _local(self, outputs: dict[str, jax.Array]) -> dict[str, np.ndarray]:
        local = multihost_utils.global_array_to_host_local_array(outputs, self.mesh, ROWS)
        return {k: np.asarray(v) for k, v in local.items()}

    def teacher_forced(self, batch: EvalBatch) -> dict[str, np.ndarray]:
        """This process's rows of the teacher-forced outputs (mask_logits [rows, M, H, W], ...)."""
        with jax.set_mesh(self.mesh):  # the model's sharding constraints apply
            out = _teacher_forced_step(self.graphdef, self.state, self._global(batch.arrays), batch.out_hw, self.mesh,
                                       batch.groups * jax.process_count())
        return self._local(out)

    def generate(self, batch: EvalBatch, sampling: SamplingConfig, eos_id: int, pad_id: int,
                 key: jax.Array) -> dict[str, np.ndarray]:
        """This process's rows of the generation outputs (tokens, lengths, mask_logits, ...)."""
        key = jax.device_put(key, NamedSharding(self.mesh, PartitionSpec()))
        with jax.set_mesh(self.mesh):
            out = _generate_step(self.graphdef, self.state, self._global(batch.arrays), key, batch.out_hw, sampling,
                                 int(eos_id), int(pad_id), self.mesh, batch.groups * jax.process_count())
        return self._local(out)


def agree_on_shapes(batch: EvalBatch, pad_id: int) -> EvalBatch:
    """Pad a batch to the largest token length and canvas of all processes (no-op with one process)."""
    if jax.process_count() == 1:
        return batch
    mine = np.array([batch.arrays["input_ids"].shape[1], *batch.out_hw], np.int64)
    t, h, w = (int(x) for x in np.max(multihost_utils.process_allgather(mine), axis=0))
    arrays = dict(batch.arrays)
    extra = t - arrays["input_ids"].shape[1]
    arrays["input_ids"] = np.pad(arrays["input_ids"], ((0, 0), (0, extra)), constant_values=pad_id)
    arrays["attention_mask"] = np.pad(arrays["attention_mask"], ((0, 0), (0, extra)))
    return dataclasses.replace(batch, arrays=arrays, out_hw=(h, w))


def any_process(flag: bool) -> bool:
    """Whether `flag` holds in any process (every process must call this together)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def sampling_key(seed: int, batch_index: int) -> jax.Array:
    """The PRNG key of one batch: a function of the seed and the batch's position in the run."""
    return jax.random.fold_in(jax.random.key(seed), batch_index)


def idle_batch(shape: BatchShape, pad_id: int) -> EvalBatch:
    """A batch of the smallest shapes with no items, for a process that has run out of data."""
    s, t = shape.image_size, min(shape.token_buckets)
    ids = np.full((shape.rows, t), pad_id, np.int32)
    ids[:, 0] = IMAGE_TOKEN
    mask = np.zeros((shape.rows, t), bool)
    mask[:, 0] = True
    arrays = {
        "pixels": np.zeros((shape.images, s, s, 3), np.float32),
        "resized_hw": np.full((shape.images, 2), s, np.int32),
        "original_hw": np.ones((shape.images, 2), np.int32),
        "input_ids": ids, "attention_mask": mask,
        "conv_image": block_first_rows(shape.groups, shape.images, shape.rows),
        "conv_valid": np.zeros((shape.rows,), bool),
    }
    return EvalBatch(arrays, [], (shape.canvas_step, shape.canvas_step), [], shape.groups)
