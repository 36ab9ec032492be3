"""The device mesh (data, fsdp, tensor) from `MeshConfig`.

Every process builds the same global mesh over all devices (`jax.devices()`); one axis may be −1
and takes the devices left over. Training and conversion (`pixellm convert --mesh`) build it here;
how parameters and activations land on its axes is `sharding.py`'s rule table.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from pixellm_jax.config import MeshConfig
from pixellm_jax.sharding import MESH_AXES


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with a −1 entry resolved; raises ValueError naming the mesh keys."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % fixed:
            raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes (product {fixed})")
        sizes[sizes.index(-1)] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh: data×fsdp×tensor = {'×'.join(map(str, sizes))} needs {math.prod(sizes)} "
                         f"devices, but there are {num_devices}")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes).

    Axes are `Auto`: shardings are given at jit boundaries and propagated by the compiler.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    auto = (AxisType.Auto,) * len(MESH_AXES)
    if len(devices) == len(jax.devices()):  # topology-aware device order on TPU/GPU
        return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=auto)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)
