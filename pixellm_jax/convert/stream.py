"""Filling the parameters from a checked plan, one source tensor at a time.

Without a mesh every parameter gets a preallocated NumPy buffer in its storage dtype (a file-backed
`np.memmap` when `buffer_dir` is given, so host memory holds about one source tensor at a time, not
the model). Source tensors are read file by file in stored order (the next file read ahead), and
copied, transformed and cast in one strided copy, into their slice: `layer` of a stacked parameter,
the leading rows of a grown vocabulary. With shardings every parameter becomes a `jax.Array` built by
`jax.make_array_from_callback`: each device's callback reads only the source slices its shard needs
(through the transform's index mapping), so no host ever holds a whole model. Every floating-point
source tensor (or slice) read is checked for NaN/Inf (`FiniteCheck`): an error naming the key, or a
warning with `--allow-nonfinite`. Parameters a plan initialises come from `initial_values`, the
model's own initialisers run inside one jit (XLA drops every other parameter's initialiser).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Sharding
from tqdm.auto import tqdm

from pixellm_jax.config import ModelConfig
from pixellm_jax.convert.errors import ConversionError
from pixellm_jax.convert.readers import FLOAT_DTYPES
from pixellm_jax.convert.tables import Permute, Transform
from pixellm_jax.convert.validate import Load, Plan, Target
from pixellm_jax.models.trainable import build_pixellm


def path_str(path: Sequence) -> str:
    """'/'-joined NNX state path."""
    return "/".join(str(p) for p in path)


_INIT_FNS: dict[str, object] = {}
# Hundreds of random initialisers take XLA:CPU tens of seconds to optimise, for a program run once.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def initial_values(
    model_cfg: ModelConfig, seed: int, paths: Sequence[str], shardings: Mapping[str, Sharding] | None = None
) -> dict[str, jax.Array]:
    """The freshly initialised values of `paths` (as `build_pixellm(model_cfg, seed)` makes them).

    The jitted initialiser is memoised per config, seed and paths (tracing the model takes seconds).
    """
    paths = sorted(paths)
    if not paths:
        return {}
    key = f"{model_cfg!r}/{seed}/{paths}/{shardings}"
    if key not in _INIT_FNS:

        def build():
            state = nnx.state(build_pixellm(model_cfg, seed))
            flat = {path_str(p): v.get_value() for p, v in nnx.to_flat_state(state)}
            return {p: flat[p] for p in paths}

        out_shardings = None if shardings is None else {p: shardings[p] for p in paths}
        lowered = jax.jit(build, out_shardings=out_shardings).trace().lower()
        if len(_INIT_FNS) >= 4:
            _INIT_FNS.pop(next(iter(_INIT_FNS)))
        _INIT_FNS[key] = lowered.compile(_FAST_COMPILE if jax.default_backend() == "cpu" else None)
    return _INIT_FNS[key]()


def _progress(total: int, enabled: bool, desc: str):
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not enabled,
                leave=False)


# Values checked for NaN/Inf at a time: the boolean temporary stays a few MiB whatever the tensor's size.
_CHECK_VALUES = 1 << 22


def count_nonfinite(x: np.ndarray) -> int:
    """The number of NaN and infinite values in `x`, counted in bands of its leading axis."""
    if x.ndim == 0:
        return int(not np.isfinite(x))
    rows = max(1, _CHECK_VALUES * x.shape[0] // max(x.size, 1))
    bands = (x[i: i + rows] for i in range(0, x.shape[0], rows))
    return sum(band.size - int(np.count_nonzero(np.isfinite(band))) for band in bands)


@dataclass
class FiniteCheck:
    """NaN/Inf in the source tensors read: a ConversionError naming the key and the count, or with
    `allow` (`--allow-nonfinite`) one warning per key, collected in `warnings`."""

    allow: bool = False
    warnings: dict[str, str] = field(default_factory=dict)

    def __call__(self, load: Load, x: np.ndarray) -> None:
        if x.dtype not in FLOAT_DTYPES or not (bad := count_nonfinite(x)):
            return
        where = f"{load.info.file}: {load.info.key}"
        what = f"{bad} of the {x.size} values read are NaN or infinite"
        if not self.allow:
            raise ConversionError(f"{where}: {what} (pass --allow-nonfinite to convert them as they are)")
        self.warnings.setdefault(where, f"{where}: {what}; converted as they are (--allow-nonfinite)")


def _read(load: Load, dtype: np.dtype, check: FiniteCheck, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """The target-layout value of `load` (or its part `index`, in target coordinates) in `dtype`."""
    source_index = None if index is None else load.transform.source_index(index, load.info.shape)
    x = load.reader.read(load.info.key, source_index)
    check(load, x)
    x = load.transform.forward(x)
    if index is not None and source_index is None:
        x = x[index]
    return np.asarray(x).astype(dtype, copy=False)


def _buffer(target: Target, buffer_dir: Path | None, number: int) -> np.ndarray:
    if buffer_dir is None or not target.shape or 0 in target.shape:
        return np.empty(target.shape, target.dtype)
    return np.memmap(buffer_dir / f"{number:05d}.raw", dtype=target.dtype, mode="w+", shape=target.shape)


def grown_slice(load: Load, x: np.ndarray) -> tuple[slice, ...]:
    """The leading part of a grown target (e.g. an enlarged vocabulary) that source tensor `x` fills."""
    return (slice(None),) * load.grow + (slice(0, x.shape[load.grow]),)


def fill_buffers(
    plan: Plan,
    targets: Mapping[str, Target],
    initial: Mapping[str, jax.Array | np.ndarray],
    *,
    buffer_dir: Path | None = None,
    progress: bool = False,
    check: FiniteCheck | None = None,
) -> dict[str, np.ndarray]:
    """Host arrays of every target: initial values first, then each source tensor streamed in
    (checked by `check`; default: any NaN/Inf is an error)."""
    check = check or FiniteCheck()
    if buffer_dir is not None:
        buffer_dir.mkdir(parents=True, exist_ok=True)
    buffers = {path: _buffer(t, buffer_dir, i) for i, (path, t) in enumerate(targets.items())}
    for path, value in initial.items():
        buffers[path][...] = np.asarray(jax.device_get(value)).astype(targets[path].dtype, copy=False)
    files = list(dict.fromkeys(ld.info.file for ld in plan.loads))
    with _progress(sum(ld.info.nbytes for ld in plan.loads), progress, "converting") as bar:
        for load in plan.loads:  # in source file order
            at = files.index(load.info.file)
            for f in files[at: at + 2]:  # this file and the next are read ahead while we transform
                load.reader.prefetch(f)
            x = load.reader.read(load.info.key)  # a view of the memory-mapped file where possible
            check(load, x)
            dst = buffers[load.target]
            if load.layer is not None:
                dst = dst[load.layer]
            if load.grow is not None:
                dst = dst[grown_slice(load, load.transform.forward(x))]
            copy_transformed(dst, x, load.transform)
            del x
            bar.update(load.info.nbytes)
    return buffers


def _torch_view(a: np.ndarray):
    """A torch tensor sharing `a`'s memory (bfloat16 through an int16 view)."""
    import warnings

    import torch

    with warnings.catch_warnings():  # read-only sources are only read
        warnings.simplefilter("ignore", UserWarning)
        if a.dtype == ml_dtypes.bfloat16:
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)


# A source band this large stays in cache while its transposed columns are written: banded copies on
# a few threads run ~2x faster than one strided copy of the whole tensor (torch releases the GIL).
_BAND_BYTES = 512 << 10
_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(min(os.cpu_count() or 1, 8), thread_name_prefix="convert-copy")
    return _POOL


def _copy(dst, src) -> None:
    if src.dtype != dst.dtype and not src.is_contiguous():
        src = src.contiguous()  # torch's fused transpose-and-cast copy is many times slower than the two
    dst.copy_(src)


def copy_transformed(dst: np.ndarray, x: np.ndarray, transform: Transform) -> None:
    """dst[...] = transform.forward(x), cast to dst's dtype, without a temporary copy of x.

    Axis permutations of float tensors run as torch strided copies (several times faster than
    NumPy's for transposes; torch is there whenever a checkpoint is read): a large tensor in bands of
    its leading source axis, on a small thread pool; the rest through NumPy.
    """
    if not (isinstance(transform, Permute) and x.dtype in FLOAT_DTYPES and dst.dtype in FLOAT_DTYPES):
        np.copyto(dst, transform.forward(x), casting="same_kind")
        return
    src, out = _torch_view(x), _torch_view(dst)
    perm = transform.perm if transform.perm is not None else tuple(range(x.ndim))
    if transform.flip or x.ndim == 0 or x.nbytes < 2 * _BAND_BYTES:
        src = src.permute(perm)
        _copy(out, src.flip(transform.flip) if transform.flip else src)
        return
    rows = max(1, _BAND_BYTES * x.shape[0] // x.nbytes)
    axis = perm.index(0)  # where the source's leading axis lands in the target

    def band(start: int) -> None:
        n = min(rows, x.shape[0] - start)
        _copy(out.narrow(axis, start, n), src.narrow(0, start, n).permute(perm))

    for _ in _pool().map(band, range(0, x.shape[0], rows)):
        pass


def place_sharded(
    plan: Plan,
    targets: Mapping[str, Target],
    initial: Mapping[str, jax.Array],
    shardings: Mapping[str, Sharding],
    *,
    progress: bool = False,
    check: FiniteCheck | None = None,
) -> dict[str, jax.Array]:
    """Global arrays of every target, each device's shard read from the sources on its own (each slice
    checked by `check`; default: any NaN/Inf is an error)."""
    check = check or FiniteCheck()
    by_target = plan.by_target()
    out: dict[str, jax.Array] = {}
    total = sum(int(np.prod(t.shape)) * t.dtype.itemsize for t in targets.values())
    with _progress(total, progress, "converting") as bar:
        for path, target in targets.items():
            loads = by_target.get(path)
            if not loads:
                out[path] = initial[path]
            elif loads[0].grow is not None:  # vocabulary grown: one host copy of this matrix, then slices
                full = np.asarray(jax.device_get(initial[path])).astype(target.dtype)
                x = _read(loads[0], target.dtype, check)
                full[grown_slice(loads[0], x)] = x
                out[path] = jax.make_array_from_callback(target.shape, shardings[path], lambda idx, f=full: f[idx])
            elif loads[0].layer is not None:
                by_layer = {ld.layer: ld for ld in loads}

                def stacked(idx, by_layer=by_layer, target=target):
                    layers = range(*idx[0].indices(target.shape[0]))
                    return np.stack([_read(by_layer[i], target.dtype, check, idx[1:]) for i in layers])

                out[path] = jax.make_array_from_callback(target.shape, shardings[path], stacked)
            else:
                out[path] = jax.make_array_from_callback(
                    target.shape, shardings[path], lambda idx, ld=loads[0], t=target: _read(ld, t.dtype, check, idx)
                )
            bar.update(int(np.prod(target.shape)) * target.dtype.itemsize)
    return out
