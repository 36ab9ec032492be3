"""Preemption notices: SIGTERM (what TPU maintenance events, SLURM and Kubernetes send before
killing a job) sets a flag that the loop checks between steps, so the run saves and exits cleanly.

With several processes the flag is agreed on: every process learns that any one was told, so they
all save the same step together.
"""

from __future__ import annotations

import signal
from types import FrameType

import jax
import numpy as np


class PreemptionWatch:
    """Catches `signals` while active (a context manager); `requested()` says whether one came."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def __enter__(self) -> "PreemptionWatch":
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()

    def requested(self) -> bool:
        """Whether any process received a signal (a collective when there are several processes)."""
        local = self.received is not None
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.int32(local))))
