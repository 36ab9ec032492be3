"""A conversion from an `ImportSpec`: plan (checked whole), initial values, streamed fill, checkpoint.

`convert_checkpoint` writes the Orbax directory (staged beside the destination and renamed when
complete, refused over an existing one without `force`); `convert_model` returns the model in memory
(tests, `--check`). With a mesh, parameters are built shard by shard on their devices. A source tensor
holding NaN/Inf stops the conversion unless `allow_nonfinite` (then it is a warning, in the report too).

Storage dtypes (`storage_targets`): by default (`convert.param_dtype: source`) a loaded parameter keeps
its source tensors' dtype, so a conversion is exact and exports back to the same bytes; parameters
the source does not hold (LoRA factors of a base model) take the model's dtypes. An explicit
`convert.param_dtype` stores every floating-point parameter in that dtype.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jax.sharding import Mesh

from pixellm_jax.config import Config
from pixellm_jax.convert.checkpoint import (
    assemble_model,
    check_output,
    param_shardings,
    staged_output,
    target_specs,
    write_checkpoint,
)
from pixellm_jax.convert.importers import ImportSpec
from pixellm_jax.convert.stream import FiniteCheck, fill_buffers, initial_values, place_sharded
from pixellm_jax.convert.tables import transforms_for
from pixellm_jax.convert.readers import FLOAT_DTYPES
from pixellm_jax.convert.validate import Plan, Target, build_plan
from pixellm_jax.models.pixellm import PixelLM


@dataclass
class Conversion:
    plan: Plan
    config: Config
    output: Path | None = None
    warnings: list[str] = field(default_factory=list)  # source tensors converted with NaN/Inf values


def plan_conversion(spec: ImportSpec) -> Plan:
    """The checked mapping (raises one ConversionError listing every problem)."""
    return build_plan(
        spec.sources, target_specs(spec.config.model), transforms_for(spec.config.model.vision),
        initialise=spec.initialise, skippable_groups=spec.skippable_groups, allow_grow=spec.allow_grow,
    )


STORED_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16), "float16": np.dtype(np.float16)}


def _storable(dtype: np.dtype) -> np.dtype:
    """float64 sources are stored as float32 (JAX runs without 64-bit floats)."""
    return np.dtype(np.float32) if dtype == np.float64 else np.dtype(dtype)


def storage_targets(targets: dict[str, Target], plan: Plan, param_dtype: str) -> dict[str, Target]:
    """`targets` with the dtype each parameter is stored in (see the module docstring)."""
    loads = plan.by_target()
    out = {}
    for path, target in targets.items():
        dtype = target.dtype
        if dtype in FLOAT_DTYPES:
            if param_dtype != "source":
                dtype = STORED_DTYPES[param_dtype]
            elif path in loads:  # layers of one stacked parameter could differ: the widest holds them all
                dtype = _storable(np.dtype(jnp.result_type(*(ld.info.dtype for ld in loads[path]))))
        out[path] = dataclasses.replace(target, dtype=dtype)
    return out


def stored_dtypes(targets: dict[str, Target]) -> dict[str, int]:
    """How many parameters are stored in each dtype (for the report)."""
    return dict(sorted(Counter(str(t.dtype) for t in targets.values()).items()))


def _parameters(spec: ImportSpec, plan: Plan, mesh: Mesh | None, buffer_dir: Path | None, progress: bool,
                check: FiniteCheck):
    cfg = spec.config
    targets = storage_targets(target_specs(cfg.model), plan, cfg.convert.param_dtype)
    to_init = list(plan.initialised) + list(plan.partial)
    if mesh is None:
        initial = initial_values(cfg.model, cfg.seed, to_init)
        return fill_buffers(plan, targets, initial, buffer_dir=buffer_dir, progress=progress, check=check)
    shardings = param_shardings(cfg.model, mesh)
    initial = initial_values(cfg.model, cfg.seed, to_init, shardings)
    return place_sharded(plan, targets, initial, shardings, progress=progress, check=check)


def conversion_report(spec: ImportSpec, plan: Plan) -> dict:
    stored = storage_targets(target_specs(spec.config.model), plan, spec.config.convert.param_dtype)
    return {"source": spec.info, "config": spec.config.name, "notes": spec.notes,
            "param_dtype": spec.config.convert.param_dtype, "stored_dtypes": stored_dtypes(stored),
            "plan": plan.report()}


def convert_checkpoint(
    spec: ImportSpec,
    out: str | Path,
    *,
    force: bool = False,
    mesh: Mesh | None = None,
    progress: bool = False,
    allow_nonfinite: bool = False,
) -> Conversion:
    """Convert and write the checkpoint directory `out` (see checkpoint.py for its layout)."""
    out = Path(out)
    check_output(out, force)
    plan = plan_conversion(spec)
    check = FiniteCheck(allow=allow_nonfinite)
    with staged_output(out, force) as stage:
        params = _parameters(spec, plan, mesh, None if mesh is not None else stage / ".buffers", progress, check)
        extras = {info.key: reader.read(info.key) for reader, info, _ in plan.kept}
        warnings = list(check.warnings.values())
        report = conversion_report(spec, plan) | ({"nonfinite": warnings} if warnings else {})
        write_checkpoint(stage, params, spec.config, report=report, extras=extras,
                         write_tokenizer=spec.write_tokenizer)
        del params
        shutil.rmtree(stage / ".buffers", ignore_errors=True)
    return Conversion(plan, spec.config, out, warnings)


def convert_model(spec: ImportSpec, mesh: Mesh | None = None) -> tuple[PixelLM, Plan]:
    """The converted model in memory (no files written)."""
    plan = plan_conversion(spec)
    params = _parameters(spec, plan, mesh, None, False, FiniteCheck())
    return assemble_model(spec.config.model, params, spec.config.seed, mesh), plan
