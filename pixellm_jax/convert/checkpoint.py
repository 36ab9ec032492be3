"""The converted-checkpoint directory, and `load_pretrained`, which training, evaluation and prediction call.

Layout::

    <dir>/params/                    Orbax PyTree: the model's parameters and buffers, nested by NNX path
    <dir>/config.yaml                the full `Config` the parameters belong to
    <dir>/tokenizer/                 tokenizer files (`AutoTokenizer.from_pretrained` loads them)
    <dir>/conversion.json            what was loaded, initialised, skipped, kept and ignored, from where
    <dir>/extra_tensors.safetensors  source tensors the model does not use, kept for exports (optional)

A directory is written beside its destination (`.<name>.partial`) and renamed into place when
complete; an existing destination is only replaced with `force`. Parameters are written by Orbax
without defensive host copies, stacked layers one chunk per layer, and no compression (weights do not
compress), so a file-backed buffer streams to disk holding at most one chunk in host memory; sharded
device arrays are written shard by shard by the processes that hold them.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping, NamedTuple, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from pixellm_jax.config import Config, ConfigError, ModelConfig, dump_config, load_config
from pixellm_jax.convert.errors import ConversionError
from pixellm_jax.convert.stream import path_str
from pixellm_jax.convert.validate import Target
from pixellm_jax.models.pixellm import PixelLM
from pixellm_jax.models.sam_layers import Buffer
from pixellm_jax.models.trainable import build_pixellm
from pixellm_jax.sharding import state_shardings

PARAMS_DIR = "params"
CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
REPORT_FILE = "conversion.json"
EXTRAS_FILE = "extra_tensors.safetensors"
LAYER_CHUNK_BYTES = 64 << 20

# What a checkpoint stores: parameters (LoRA factors included) and buffers; RNG streams are rebuilt.
SAVED = nnx.Any(nnx.Param, Buffer)


class Pretrained(NamedTuple):
    model: PixelLM
    config: Config
    tokenizer_dir: Path
    report: dict


_ABSTRACT: dict[str, PixelLM] = {}


def abstract_model(model_cfg: ModelConfig, seed: int = 0) -> PixelLM:
    """The model with ShapeDtypeStructs for values (no memory); memoised, tracing it takes seconds."""
    key = f"{model_cfg!r}/{seed}"
    if key not in _ABSTRACT:
        if len(_ABSTRACT) >= 4:
            _ABSTRACT.pop(next(iter(_ABSTRACT)))
        _ABSTRACT[key] = nnx.eval_shape(lambda: build_pixellm(model_cfg, seed))
    return _ABSTRACT[key]


def target_specs(model_cfg: ModelConfig) -> dict[str, Target]:
    """Every saved parameter/buffer of the model built from `model_cfg`: path -> shape and dtype."""
    state = nnx.state(abstract_model(model_cfg), SAVED)
    out = {}
    for p, v in nnx.to_flat_state(state):
        value = v.get_value()
        out[path_str(p)] = Target(path_str(p), tuple(value.shape), np.dtype(value.dtype))
    return out


def param_shardings(model_cfg: ModelConfig, mesh: Mesh) -> dict[str, NamedSharding]:
    """The mesh sharding of every saved variable, from its logical axes (`sharding.LOGICAL_RULES`)."""
    shardings = state_shardings(nnx.state(abstract_model(model_cfg), SAVED), mesh)
    return {path_str(p): s for p, s in nnx.to_flat_state(shardings)}


def _nest(flat: Mapping[str, object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _flatten(tree: Mapping, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(_flatten(value, path))
        else:
            out[path] = value
    return out


def check_output(out: Path, force: bool) -> None:
    """Refuse to touch an existing output unless forced (checked before any work is done)."""
    if out.exists() and not force:
        raise ConversionError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{out} exists and is not a directory")


def _sync(name: str) -> None:
    """Barrier across processes (multi-host conversion writes into one shared directory)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


@contextmanager
def staged_output(out: str | Path, force: bool = False) -> Iterator[Path]:
    """A fresh staging directory beside `out`, renamed to `out` when the block completes.

    On an error the staging directory is removed and `out` is left as it was. With several processes
    the directory operations are process 0's; the others wait for them.
    """
    out = Path(out).absolute()
    check_output(out, force)
    stage = out.parent / f".{out.name}.partial"
    primary = jax.process_index() == 0
    if primary:
        if stage.exists():  # left by an interrupted run
            shutil.rmtree(stage)
        stage.mkdir(parents=True)
    _sync(f"staged:{out}")
    try:
        yield stage
    except BaseException:
        if primary:
            shutil.rmtree(stage, ignore_errors=True)
        raise
    _sync(f"written:{out}")
    if not primary:
        return
    if out.exists():
        old = out.parent / f".{out.name}.replaced"
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
        stage.rename(out)
        shutil.rmtree(old)
    else:
        stage.rename(out)


def type_handler_registry(deepcopy_host_arrays: bool = True):
    """Orbax's standard handlers (scalars, numpy, jax arrays) with replica-parallel writing off: it
    compiles a slicing program per array shape, minutes for a model on a CPU host."""
    from orbax.checkpoint import type_handlers

    scalar = type_handlers.ScalarHandler()
    return type_handlers.create_type_handler_registry(
        (int, scalar), (float, scalar), (bytes, scalar), (np.number, scalar),
        (np.ndarray, type_handlers.NumpyHandler(deepcopy_host_arrays=deepcopy_host_arrays)),
        (jax.Array, type_handlers.ArrayHandler(use_replica_parallel=False)),
    )


def _checkpointer(sharded: bool):
    """Orbax without defensive host copies or compression. Host buffers go to one zarr array per
    parameter (OCDBT would stage a whole array in memory); device arrays, written shard by shard, go
    to OCDBT (far fewer files)."""
    import orbax.checkpoint as ocp

    registry = type_handler_registry(deepcopy_host_arrays=False)
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=sharded, use_compression=False, type_handler_registry=registry)
    return ocp, ocp.Checkpointer(handler)


def save_params(directory: Path, params: Mapping[str, np.ndarray | jax.Array]) -> None:
    """Write the flat parameter dict as a nested Orbax PyTree at `directory`.

    Large stacked (per-layer) parameters are stored in one chunk per layer, so encoding a chunk never
    copies more than one layer's tensor; other parameters are one chunk each. (A byte-size target is
    not used: Orbax chunks by divisors, and a prime vocabulary size such as 32009 would give
    one-column chunks.)
    """
    directory = Path(directory).absolute()  # Orbax refuses relative paths
    ocp, checkpointer = _checkpointer(sharded=any(isinstance(v, jax.Array) for v in params.values()))
    tree = _nest(params)

    def save_args(x):
        stacked = x.ndim >= 3 and x.size * x.dtype.itemsize > LAYER_CHUNK_BYTES
        return ocp.SaveArgs(shard_axes=(0,) if stacked else ())

    checkpointer.save(directory, args=ocp.args.PyTreeSave(tree, save_args=jax.tree.map(save_args, tree)))


def write_checkpoint(
    directory: Path,
    params: Mapping[str, np.ndarray | jax.Array],
    cfg: Config,
    *,
    report: dict,
    extras: Mapping[str, np.ndarray] | None = None,
    write_tokenizer: Callable[[Path], None] | None = None,
) -> None:
    """Fill a (staging) directory with parameters, config, tokenizer, report and extras."""
    save_params(directory / PARAMS_DIR, params)
    if jax.process_index() != 0:
        return
    (directory / CONFIG_FILE).write_text(dump_config(cfg))
    (directory / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str) + "\n")
    if write_tokenizer is not None:
        write_tokenizer(directory / TOKENIZER_DIR)
    if extras:
        from safetensors.torch import save_file

        from pixellm_jax.convert.readers import to_torch

        save_file({k: to_torch(v) for k, v in extras.items()}, str(directory / EXTRAS_FILE), metadata={"format": "pt"})


def _require_files(directory: Path) -> None:
    if not (directory / PARAMS_DIR).is_dir() or not (directory / CONFIG_FILE).is_file():
        raise ConversionError(
            f"{directory}: not a pixellm-jax checkpoint (needs {PARAMS_DIR}/ and {CONFIG_FILE}; "
            f"convert PyTorch weights with `pixellm convert`)"
        )


def _saved_dtype(metadata, default: np.dtype) -> np.dtype:
    dtype = getattr(metadata, "dtype", None)
    return default if dtype is None else np.dtype(dtype)


def restore_params(directory: str | Path, model_cfg: ModelConfig, mesh: Mesh | None = None) -> dict[str, jax.Array]:
    """The saved parameters, each in the dtype it is stored in (sharded over `mesh` when given).

    Storage dtypes are the checkpoint's (a conversion keeps the source's, see converter.py), so a
    model loaded from it computes with exactly the converted values; the compute dtype is the
    config's. Saved and expected parameter sets and shapes are compared first; a mismatch is one
    error that names every differing path.
    """
    directory = Path(directory).absolute()
    _require_files(directory)
    import orbax.checkpoint as ocp

    targets = target_specs(model_cfg)
    checkpointer = ocp.PyTreeCheckpointer()
    saved = _flatten(checkpointer.metadata(directory / PARAMS_DIR).item_metadata.tree)
    extra = sorted(set(saved) - set(targets))
    absent = sorted(set(targets) - set(saved))
    shapes = [f"{p}: saved {list(saved[p].shape)}, the config needs {list(t.shape)}"
              for p, t in targets.items() if p in saved and tuple(saved[p].shape) != t.shape]
    if extra or absent or shapes:
        raise ConversionError(
            f"{directory / PARAMS_DIR} does not fit the model of {directory / CONFIG_FILE}:"
            + "".join(f"\n  {title}: {', '.join(rows)}" for title, rows in (
                ("not in the model", extra), ("not in the checkpoint", absent), ("other shape", shapes)) if rows)
        )
    if mesh is None:
        one = SingleDeviceSharding(jax.local_devices()[0])
        shardings = {p: one for p in targets}
    else:
        shardings = param_shardings(model_cfg, mesh)
    item = _nest({p: jax.ShapeDtypeStruct(t.shape, _saved_dtype(saved[p], t.dtype), sharding=shardings[p])
                  for p, t in targets.items()})
    restored = checkpointer.restore(
        directory / PARAMS_DIR,
        args=ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item)),
    )
    return _flatten(restored)


def assemble_model(
    model_cfg: ModelConfig, params: Mapping[str, jax.Array | np.ndarray], seed: int = 0, mesh: Mesh | None = None
) -> PixelLM:
    """A PixelLM holding `params` (flat path -> array); RNG streams (LoRA dropout) made fresh from `seed`."""
    graphdef, saved, rest = nnx.split(abstract_model(model_cfg, seed), SAVED, ...)
    flat = [(p, v.replace(jax.numpy.asarray(params[path_str(p)]) if mesh is None else params[path_str(p)]))
            for p, v in nnx.to_flat_state(saved)]
    saved = nnx.from_flat_state(flat)
    if len(nnx.to_flat_state(rest)):  # built by the initialiser, which XLA prunes to just these
        replicated = None if mesh is None else NamedSharding(mesh, PartitionSpec())
        rest = jax.jit(lambda: nnx.state(build_pixellm(model_cfg, seed), nnx.Not(SAVED)), out_shardings=replicated)()
    return nnx.merge(graphdef, saved, rest)


def load_pretrained(directory: str | Path, mesh: Mesh | None = None, overrides: Sequence[str] = ()) -> Pretrained:
    """Open a converted (or exported-from-training) checkpoint directory as a ready model.

    `overrides` (`section.field=value`) adjust the stored config, e.g. `model.dtype=float32`; ones that
    change parameter shapes are refused with the differing paths. With `mesh`, every array is restored
    directly into its sharding.
    """
    directory = Path(directory).absolute()
    _require_files(directory)
    try:
        cfg = load_config(directory / CONFIG_FILE, overrides)
    except ConfigError as e:
        raise ConversionError(f"{directory / CONFIG_FILE}: {e}") from None
    params = restore_params(directory, cfg.model, mesh)
    model = assemble_model(cfg.model, params, cfg.seed, mesh)
    report_path = directory / REPORT_FILE
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    return Pretrained(model, cfg, directory / TOKENIZER_DIR, report)


def model_params(model: PixelLM) -> dict[str, jax.Array]:
    """Flat path -> array of everything a checkpoint stores."""
    return {path_str(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, SAVED))}
