"""Multi-host start-up: `jax.distributed.initialize()` when the environment describes a cluster.

JAX detects Cloud TPU pod slices, SLURM jobs with more than one task, Open MPI and Kubernetes by
itself; an explicit coordinator is given with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID (what `launch/local.sh` sets). A process whose peer dies stops within the heartbeat
timeout (PIXELLM_HEARTBEAT_TIMEOUT seconds, default 100) instead of hanging in a collective.
"""

from __future__ import annotations

import os

import jax


def cluster_requested() -> bool:
    """Whether this process is one of several (explicit coordinator, SLURM job, TPU pod worker)."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env:
        return True
    return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def initialize(mode: str = "auto") -> None:
    """Join the cluster before any device is touched (mode "off": stay a single process)."""
    if mode == "off" or not cluster_requested() or jax.distributed.is_initialized():
        return
    kwargs = {}
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        kwargs = dict(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    timeout = int(os.environ.get("PIXELLM_HEARTBEAT_TIMEOUT", "100"))
    jax.distributed.initialize(**kwargs, heartbeat_timeout_seconds=timeout,
                               initialization_timeout=max(timeout, 60))


def barrier(name: str, timeout_s: int = 1800) -> None:
    """Wait until every process reaches `name`, through the coordination service (no device
    collective, so processes may arrive minutes apart: one compiling while another has finished)."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed

    jax_distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)
