"""The conversion plan: which source tensor fills which parameter (slice), checked as a whole first.

`build_plan` runs every source key through its table. Each key is loaded, ignored (with a reason),
kept verbatim (extras an export re-emits) or skipped (a group of another shape, e.g. a LLaVA
projector PixelLM replaces); anything else is an error. Every parameter (every layer slice of a
stacked one) must be filled exactly once, or be one the importer initialises, and a floating-point
parameter from a floating-point tensor. All unexpected, wrong-shaped, wrongly typed, doubly given and
missing keys are collected and raised together as one `ConversionError`, before anything is read or
written. The plan also prints as the `--dry-run` mapping and summarises itself for the conversion
report.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Collection, Mapping, Sequence

import numpy as np

from pixellm_jax.convert.errors import ConversionError
from pixellm_jax.convert.readers import FLOAT_DTYPES, CheckpointReader, TensorInfo
from pixellm_jax.convert.tables import Table, Transform


@dataclass(frozen=True)
class Target:
    """A parameter of the model being filled: flat path ('/'-joined), shape and storage dtype."""

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclass(frozen=True)
class Source:
    """One checkpoint and the table that reads it."""

    reader: CheckpointReader
    table: Table


@dataclass(frozen=True)
class Load:
    """Source tensor -> target (the `layer` slice of a stacked target; the leading entries along
    `grow` when the source has fewer vocabulary rows than the target)."""

    reader: CheckpointReader
    info: TensorInfo
    target: str
    transform: Transform
    layer: int | None = None
    grow: int | None = None


@dataclass
class Plan:
    loads: list[Load]
    initialised: dict[str, str] = field(default_factory=dict)  # path -> why it is not loaded
    partial: dict[str, str] = field(default_factory=dict)  # path -> which part the source fills
    ignored: list[tuple[TensorInfo, str]] = field(default_factory=list)
    kept: list[tuple[CheckpointReader, TensorInfo, str]] = field(default_factory=list)
    skipped: list[tuple[TensorInfo, str]] = field(default_factory=list)

    def by_target(self) -> dict[str, list[Load]]:
        out: dict[str, list[Load]] = defaultdict(list)
        for load in self.loads:
            out[load.target].append(load)
        return out

    def mapping(self) -> str:
        """The `--dry-run` print: every source key and where it goes, then what is not loaded."""
        lines = ["loaded:"]
        for ld in self.loads:
            where = ld.target + (f"[{ld.layer}]" if ld.layer is not None else "")
            grow = "" if ld.grow is None else f" (first {ld.info.shape[_source_axis(ld)]} entries of axis {ld.grow})"
            lines.append(f"  {ld.info.file.name}: {ld.info.key} {list(ld.info.shape)} {ld.info.dtype} "
                         f"-> {where} ({ld.transform.name}){grow}")
        for title, rows in (
            ("initialised (not in the source):", [f"{p}: {why}" for p, why in sorted(self.initialised.items())]),
            ("partly loaded:", [f"{p}: {what}" for p, what in sorted(self.partial.items())]),
            ("skipped (not loaded):", [f"{i.file.name}: {i.key}: {why}" for i, why in self.skipped]),
            ("kept verbatim for export:", [f"{i.file.name}: {i.key}" for _, i, _ in self.kept]),
            ("ignored:", [f"{i.file.name}: {i.key}: {why}" for i, why in self.ignored]),
        ):
            if rows:
                lines += [title] + [f"  {r}" for r in rows]
        return "\n".join(lines)

    def report(self) -> dict:
        """A JSON-able account of what was loaded, initialised, skipped, kept and ignored."""
        loaded: dict[str, list[str]] = defaultdict(list)
        for ld in self.loads:
            loaded[ld.target].append(f"{ld.info.file.name}:{ld.info.key}")
        return {
            "loaded": dict(loaded),
            "initialised": dict(sorted(self.initialised.items())),
            "partial": dict(sorted(self.partial.items())),
            "skipped": [{"file": str(i.file), "key": i.key, "reason": why} for i, why in self.skipped],
            "kept": [{"file": str(i.file), "key": i.key, "reason": why} for _, i, why in self.kept],
            "ignored": [{"file": str(i.file), "key": i.key, "reason": why} for i, why in self.ignored],
        }

    def summary(self) -> str:
        """Loaded / initialised per top-level module, for the command line."""
        loaded = Counter(p.split("/")[0] for p in self.by_target())
        init = Counter(p.split("/")[0] for p in self.initialised)
        lines = [f"loaded {len(self.loads)} tensors into {sum(loaded.values())} parameters: "
                 + ", ".join(f"{m} ({n})" for m, n in sorted(loaded.items()))]
        if init:
            lines.append("initialised: " + ", ".join(f"{m} ({n})" for m, n in sorted(init.items())))
        lines += [f"partly loaded: {p}: {what}" for p, what in sorted(self.partial.items())]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} source tensors (see the report)")
        lines.append(f"ignored {len(self.ignored)}, kept verbatim {len(self.kept)} source tensors")
        return "\n".join(lines)


def _source_axis(load: Load) -> int:
    """The source axis that becomes the target's `grow` axis (permutations only)."""
    perm = getattr(load.transform, "perm", None)
    return load.grow if perm is None else perm[load.grow]


def _grows(got: tuple[int, ...], want: tuple[int, ...], axis: int | None) -> bool:
    """True when `got` equals `want` except for fewer entries along `axis`."""
    return (
        axis is not None and len(got) == len(want)
        and all(g == w or (i == axis and 0 < g < w) for i, (g, w) in enumerate(zip(got, want)))
    )


def build_plan(
    sources: Sequence[Source],
    targets: Mapping[str, Target],
    transforms: Mapping[str, Transform],
    *,
    initialise: Callable[[str], str | None] = lambda path: None,
    skippable_groups: Collection[str] = (),
    allow_grow: bool = False,
) -> Plan:
    """Map every source key; raise one ConversionError listing every problem, or return the plan.

    initialise(path) gives the reason a parameter absent from the sources may be initialised (None:
    it must be loaded). A rule group in `skippable_groups` whose shapes differ from the model's is
    skipped whole and its parameters initialised. With `allow_grow`, a source with fewer vocabulary
    rows fills the leading rows (the rest are initialised).
    """
    unexpected, wrong, wrong_dtype, twice, missing = [], [], [], [], []
    plan = Plan(loads=[])
    candidates: list[tuple[str | None, Load]] = []
    failed_groups: dict[str, list[str]] = defaultdict(list)
    misfits: set[str] = set()  # targets a wrong-shaped key was meant for (reported once, not also missing)

    for source in sources:
        table = source.table
        for key, info in source.reader.infos.items():
            where = f"{info.file.name}: {key} {list(info.shape)}"
            hit = table.rule_for_key(key)
            if hit is None:
                if (why := table.ignored(key)) is not None:
                    plan.ignored.append((info, why))
                elif (why := table.kept(key)) is not None:
                    plan.kept.append((source.reader, info, why))
                else:
                    unexpected.append(f"{where}: no rule of the {table.name} table maps this key")
                continue
            rule, path, layer = hit
            target = targets.get(path)
            if target is None:
                unexpected.append(f"{where} -> {path}, which this model does not have")
                continue
            want = target.shape[1:] if rule.stack else target.shape
            if rule.stack and not 0 <= layer < target.shape[0]:
                unexpected.append(f"{where}: layer {layer}, but {path} has {target.shape[0]} layers")
                continue
            if target.dtype in FLOAT_DTYPES and info.dtype not in FLOAT_DTYPES:
                wrong_dtype.append(f"{where} is {info.dtype} -> {path} expects a floating-point tensor "
                                   f"(float32, float16 or bfloat16; stored as {target.dtype})")
                misfits.add(path)
                continue
            transform = transforms[rule.transform]
            got = transform.target_shape(info.shape)
            grow = None
            if got != want:
                if allow_grow and _grows(got, want, rule.grow):
                    grow = rule.grow
                elif rule.group in skippable_groups:
                    failed_groups[rule.group].append(f"{key} {list(info.shape)} vs {path} {list(want)}")
                else:
                    wrong.append(f"{where} -> {path} expects {list(want)}, "
                                 f"the source gives {list(got) if got else 'an incompatible shape'} "
                                 f"after {transform.name}")
                    misfits.add(path)
                    continue
            candidates.append((rule.group, Load(source.reader, info, path, transform, layer, grow)))

    group_init: dict[str, str] = {}
    for group, load in candidates:
        if group in failed_groups:
            why = (f"the source {group} has another shape than this model's ({'; '.join(failed_groups[group][:2])}); "
                   f"it is initialised instead (configure the model with the source's shape to load it)")
            plan.skipped.append((load.info, why))
            group_init[load.target] = why
        else:
            plan.loads.append(load)

    by_target = plan.by_target()
    for path, target in targets.items():
        if path in misfits:
            continue
        loads = by_target.get(path, [])
        layered = [ld for ld in loads if ld.layer is not None]
        if layered:
            count = Counter(ld.layer for ld in layered)
            for layer, n in sorted(count.items()):
                if n > 1:
                    twice.append(f"{path}[{layer}] is given by " + ", ".join(
                        f"{ld.info.file.name}: {ld.info.key}" for ld in layered if ld.layer == layer))
            absent = [i for i in range(target.shape[0]) if i not in count]
            if absent:
                expected = _expected_key(sources, path, absent[0])
                missing.append(f"{path} layers {absent} (have {sorted(count)}) {expected}")
            continue
        if len(loads) > 1:
            twice.append(f"{path} is given by " + ", ".join(f"{ld.info.file.name}: {ld.info.key}" for ld in loads))
        elif not loads:
            why = group_init.get(path) or initialise(path)
            if why is None:
                missing.append(f"{path} {list(target.shape)} {_expected_key(sources, path, 0)}")
            else:
                plan.initialised[path] = why
        elif loads[0].grow is not None:
            ld = loads[0]
            n = ld.info.shape[_source_axis(ld)]
            plan.partial[path] = (f"entries 0..{n - 1} of axis {ld.grow} from {ld.info.key}; "
                                  f"{target.shape[ld.grow] - n} more initialised (tokens added to the vocabulary)")

    problems = [("unexpected keys", unexpected), ("wrong shapes", wrong), ("wrong dtypes", wrong_dtype),
                ("given twice", twice), ("missing (no source key fills them)", missing)]
    count = sum(len(rows) for _, rows in problems)
    if count:
        lines = [f"cannot convert: {count} problem(s); nothing was written"]
        for title, rows in problems:
            if rows:
                lines += [f"{title}:"] + [f"  {r}" for r in rows]
        raise ConversionError("\n".join(lines))
    return plan


def _expected_key(sources: Sequence[Source], path: str, layer: int) -> str:
    """'(expected e.g. <key>)' from the first table that knows the parameter, or ''."""
    for source in sources:
        hit = source.table.rule_for_target(path)
        if hit is not None:
            rule, values = hit
            return f"(expected e.g. {rule.source_key(values, layer)})"
    return ""
