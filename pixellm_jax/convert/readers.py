"""Streaming reads of PyTorch checkpoints: one tensor (or one slice of it) at a time.

A checkpoint is a directory (sharded with `*.index.json`, or a single `model.safetensors` /
`pytorch_model.bin`) or one file. Every file is opened up front, so shapes and dtypes of all keys are
known, and a truncated or unsafe file is reported before anything is converted:

* safetensors: `safe_open(framework="pt")`; `get_slice` reads only the requested slice.
* `.bin` (zip format): `torch.load(mmap=True, weights_only=True)`; tensors stay file-backed until a
  slice of them is copied out. A pickle that needs anything beyond tensors (code execution) is
  refused. Legacy (pre-zip) pickles are read without mmap, still weights-only.

Arrays come back in their stored dtype; bfloat16 goes through an int16 view into `ml_dtypes.bfloat16`
(NumPy has no bfloat16 of its own), so nothing is upcast behind the caller's back.
"""

from __future__ import annotations

import json
import math
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import ml_dtypes
import numpy as np

from pixellm_jax.convert.errors import ConversionError

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
# The floating-point dtypes a tensor can come back in (bfloat16 is no np.floating subtype).
FLOAT_DTYPES = frozenset(np.dtype(t) for t in (np.float64, np.float32, np.float16, ml_dtypes.bfloat16))


@dataclass(frozen=True)
class TensorInfo:
    """Where a key lives and what it holds, without its data."""

    key: str
    file: Path
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def to_torch(a: np.ndarray):
    """A torch tensor with `a`'s values and dtype (bfloat16 through an int16 view); copies read-only input."""
    import torch

    a = np.array(a, copy=True) if not a.flags.writeable or not a.flags.c_contiguous else a
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _numpy_dtype(torch_dtype) -> np.dtype:
    import torch

    if torch_dtype == torch.bfloat16:
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(torch.empty((), dtype=torch_dtype).numpy().dtype)


def _describe_keys(keys: list[str]) -> str:
    if not keys:
        return "its keys are unknown (no index)"
    keys = sorted(keys)
    shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    return f"it should hold {shown}"


class _SafetensorsFile:
    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        self._handle = safe_open(str(path), framework="pt")
        self.infos = {}
        for key in self._handle.keys():
            sl = self._handle.get_slice(key)
            dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype())
            if dtype is None:
                raise ConversionError(f"{path}: {key}: unsupported safetensors dtype {sl.get_dtype()}")
            self.infos[key] = TensorInfo(key, path, tuple(sl.get_shape()), np.dtype(dtype))

    def read(self, key: str, index: tuple[slice, ...] | None) -> np.ndarray:
        if index is None:
            return to_numpy(self._handle.get_tensor(key))
        return to_numpy(self._handle.get_slice(key)[index])


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


class _TorchFile:
    def __init__(self, path: Path):
        import pickle

        import torch

        self.path = path
        try:
            if zipfile.is_zipfile(path):
                tensors = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            elif _head(path) == b"PK\x03\x04":
                raise ConversionError("truncated: a zip archive without its central directory")
            else:
                warnings.warn(f"{path}: legacy (non-zip) torch file; read whole, without mmap", stacklevel=2)
                tensors = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[-1]
            raise ConversionError(
                f"refused to unpickle: the file holds objects other than tensors, which could run code "
                f"(only weights are loaded, torch.load weights_only=True): {first}"
            ) from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise ConversionError("not a state dict (a mapping of names to tensors)")
        self._tensors = tensors
        self.infos = {k: TensorInfo(k, path, tuple(v.shape), _numpy_dtype(v.dtype)) for k, v in tensors.items()}

    def read(self, key: str, index: tuple[slice, ...] | None) -> np.ndarray:
        t = self._tensors[key]
        return to_numpy(t if index is None else t[index])


def _open(path: Path, expected_keys: list[str]):
    """Open one file; any failure becomes a ConversionError naming the file and its (indexed) keys."""
    try:
        return _SafetensorsFile(path) if path.suffix == ".safetensors" else _TorchFile(path)
    except ConversionError as e:
        raise ConversionError(f"{path}: {e}; {_describe_keys(expected_keys)}") from None
    except Exception as e:  # a truncated or corrupt file surfaces as many library exception types
        raise ConversionError(
            f"{path}: cannot read checkpoint file (truncated or corrupt download?): {type(e).__name__}: {e}; "
            f"{_describe_keys(expected_keys)}"
        ) from None


def checkpoint_files(path: str | Path) -> tuple[list[Path], dict[str, str]]:
    """The tensor files of a checkpoint and its index weight map (empty without an index)."""
    path = Path(path)
    if path.is_file():
        return [path], {}
    if not path.is_dir():
        raise ConversionError(f"{path}: no such checkpoint file or directory")
    for name in INDEX_FILES:
        index_path = path / name
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise ConversionError(f"{index_path}: not a valid shard index ({e})") from None
            files = sorted(set(weight_map.values()))
            return [path / f for f in files], dict(weight_map)
    for name in SINGLE_FILES:
        if (path / name).is_file():
            return [path / name], {}
    found = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not found:
        raise ConversionError(f"{path}: no checkpoint files (*.safetensors, *.bin, or an index) found")
    return found, {}


class CheckpointReader:
    """All tensors of one checkpoint, readable one at a time (optionally one slice at a time)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        files, weight_map = checkpoint_files(self.path)
        by_file: dict[str, list[str]] = {}
        for key, name in weight_map.items():
            by_file.setdefault(name, []).append(key)
        self._files: dict[Path, _SafetensorsFile | _TorchFile] = {}
        self._prefetched: set[Path] = set()
        self.infos: dict[str, TensorInfo] = {}
        for file in files:
            expected = by_file.get(file.name, [])
            if not file.is_file():
                raise ConversionError(f"{file}: shard listed in the index is missing; {_describe_keys(expected)}")
            opened = _open(file, expected)
            absent = [k for k in expected if k not in opened.infos]
            if absent:
                raise ConversionError(
                    f"{file}: the index places {', '.join(absent[:5])} in this file, but the file lacks "
                    f"{'them' if len(absent) > 1 else 'it'} (index and shards disagree)"
                )
            for key, info in opened.infos.items():
                if key in self.infos:
                    raise ConversionError(f"{file}: {key} also appears in {self.infos[key].file}")
                self.infos[key] = info
            self._files[file] = opened

    def keys(self) -> Iterable[str]:
        """Keys in file order, then in each file's own order (the order that streams best)."""
        return self.infos.keys()

    def prefetch(self, file: Path) -> None:
        """Ask the kernel to read `file` ahead (once), so disk reads overlap the work on earlier tensors."""
        if file in self._prefetched or not hasattr(os, "posix_fadvise"):
            return
        self._prefetched.add(file)
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)

    def read(self, key: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """The tensor `key` (or its slice `index`) in its stored dtype."""
        info = self.infos.get(key)
        if info is None:
            raise ConversionError(f"{self.path}: no tensor named {key}")
        try:
            return self._files[info.file].read(key, index)
        except Exception as e:
            raise ConversionError(f"{info.file}: {key}: cannot read tensor data ({type(e).__name__}: {e})") from None
