"""What the ratio benchmarks of `tools/` share: pinned threads, interleaved repetitions, load records.

A ratio between two systems measured one after the other on a shared machine says as much about the
machine's load as about the systems (load slows eager PyTorch far more than compiled XLA code). So
every ratio benchmark here

* pins both sides to the same CPUs and thread count (`pin_threads`): the process's affinity mask is
  set to n CPUs before JAX starts its backend (XLA:CPU sizes its intra-op thread pool from the
  affinity mask, as the JAX maintainers recommend for limiting it: jax-ml/jax#1539) and
  `torch.set_num_threads(n)` gives PyTorch's intra-op pool the same n threads;
* runs the systems interleaved (`interleave`: A, B, A, B, ... after one untimed warm-up call each),
  so load that comes and goes hits every system alike, and compares medians, with the spread
  (min / quartiles / max) and the ratio of each round's pair beside them (`ratio`);
* records the 1-minute load average before and after (`LoadRecord`) in its JSON line and prints a
  warning when the machine was not idle at the start (load above `IDLE_LOAD`; the benchmark's own
  threads raise the figure *after*, so only the one before says whether others were running).

Quote figures only from runs whose JSON says `"idle": true`.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

IDLE_LOAD = 1.5  # 1-minute load average above which the machine counts as busy


def load_average() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def pin_threads(threads: int | None = None) -> dict:
    """Restrict this process to `threads` CPUs (default: all it may use) for XLA and PyTorch alike.

    Call it before the first JAX computation: XLA:CPU reads the affinity mask when its backend
    starts; if the backend is already up, its pool keeps its size and the record says so. PyTorch,
    if importable, gets `set_num_threads(threads)`. Returns what was set (for the JSON line).
    """
    allowed = sorted(os.sched_getaffinity(0))
    n = len(allowed) if threads is None else threads
    if not 1 <= n <= len(allowed):
        raise ValueError(f"--threads {threads}: this process may use {len(allowed)} CPUs ({allowed})")
    cpus = allowed[:n]
    os.sched_setaffinity(0, cpus)
    record = {"threads": n, "cpus": cpus, "cpu_count": os.cpu_count()}
    jax_bridge = sys.modules.get("jax._src.xla_bridge")
    record["xla_pinned"] = not (jax_bridge is not None and jax_bridge.backends_are_initialized())
    try:
        import torch
    except ImportError:
        record["torch_threads"] = None
    else:
        torch.set_num_threads(n)
        record["torch_threads"] = torch.get_num_threads()
    return record


@dataclass
class LoadRecord:
    """The load average at the start and at the end of a benchmark, and whether it started idle."""

    before: float = field(default_factory=lambda: load_average())
    after: float | None = None

    def finish(self) -> "LoadRecord":
        self.after = load_average()
        return self

    @property
    def idle(self) -> bool:
        return self.before <= IDLE_LOAD

    def warn(self, stream=None) -> None:
        """Print a warning (to stderr) if the machine was busy when the benchmark started."""
        if not self.idle:
            print(f"WARNING: load average {self.before:.2f} > {IDLE_LOAD} before the start: other processes "
                  "were running, the ratios are not valid figures (rerun on an idle machine)", file=stream or sys.stderr)

    def as_dict(self) -> dict:
        return {"load_before": round(self.before, 2),
                "load_after": None if self.after is None else round(self.after, 2),
                "idle": self.idle, "idle_threshold": IDLE_LOAD}


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """(seconds, result) of one call; `fn` must block until its work is done."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


@dataclass
class Interleaved:
    times: dict[str, list[float]]  # seconds of each timed call, in order
    first_call: dict[str, float]  # seconds of the first warm-up call (compilation included)
    results: dict[str, object]  # the last call's result


def interleave(systems: dict[str, Callable[[], object]], repeats: int | dict[str, int], warmup: int = 1,
               warmup_fns: dict[str, Callable[[], object]] | None = None, pause: float = 0.0) -> Interleaved:
    """Time each system `repeats` times, round-robin (A, B, A, B, ...), after `warmup` calls each.

    `repeats` may differ per system (a slow baseline fewer times): a system whose count is spent
    drops out of the later rounds. Each `fn` must block until its work is done. `warmup_fns` may
    give a system a cheaper warm-up call (one that compiles the same programs). `pause` seconds of
    sleep before each timed call let the previous system's worker threads (which spin a while after
    their work: OpenMP, Eigen) go idle; but an idle machine may also lower its clocks, which costs a
    short call more than a long one, so the benchmarks default to no pause (back-to-back calls, as an
    evaluation loop runs them).
    """
    counts = {name: repeats for name in systems} if isinstance(repeats, int) else dict(repeats)
    warmup_fns = warmup_fns or {}
    out = Interleaved({name: [] for name in systems}, {}, {})
    for name, fn in systems.items():
        for i in range(warmup if counts[name] else 0):
            seconds, out.results[name] = timed(warmup_fns.get(name, fn))
            out.first_call.setdefault(name, seconds)
    for r in range(max(counts.values(), default=0)):
        for name, fn in systems.items():
            if r < counts[name]:
                if pause:
                    time.sleep(pause)
                seconds, out.results[name] = timed(fn)
                out.times[name].append(seconds)
    return out


def summary(times: Sequence[float]) -> dict:
    """Median, quartiles, min and max of a list of seconds (rounded for a JSON line)."""
    xs = sorted(times)
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {"n": len(xs), "median": round(statistics.median(xs), 5), "min": round(xs[0], 5),
            "q1": round(q1, 5), "q3": round(q3, 5), "max": round(xs[-1], 5)}


def ratio(slow: Sequence[float], fast: Sequence[float]) -> dict:
    """How many times faster `fast` is than `slow`: the ratio of medians, and of each round's pair.

    `paired` is slow[i] / fast[i] over the rounds both ran (min / median / max), which cancels load
    that changes slowly over the run.
    """
    pairs = sorted(s / f for s, f in zip(slow, fast))
    return {"median_ratio": round(statistics.median(slow) / statistics.median(fast), 3),
            "paired_min": round(pairs[0], 3), "paired_median": round(statistics.median(pairs), 3),
            "paired_max": round(pairs[-1], 3), "pairs": len(pairs)}


def add_arguments(parser, repeats: int = 5) -> None:
    """The shared command-line options: --threads and --repeats."""
    parser.add_argument("--threads", type=int, default=None,
                        help="CPUs (and intra-op threads) for every side (default: all this process may use)")
    parser.add_argument("--repeats", type=int, default=repeats, help="interleaved timed calls per system")
