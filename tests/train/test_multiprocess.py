"""Two local processes joined by jax.distributed (launch/local.sh, CPU devices on 127.0.0.1).

They train with the same losses as one process holding all 8 devices, and when one of them dies
the other exits non-zero within the heartbeat timeout instead of hanging.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.train.conftest import SMALL

pytestmark = pytest.mark.heavy

ROOT = Path(__file__).resolve().parents[2]
HEARTBEAT = 10
RUN = [*SMALL, "mesh.fsdp=4", "mesh.tensor=2", "train.eval_batches=0", "train.save_every=0"]


def _train_command(out, *overrides):
    return [sys.executable, "-m", "pixellm_jax.cli", "train", "--config", "demo", *RUN,
            f"train.output_dir={out}", *overrides]


def _losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return np.array([[r[k] for k in ("total", "ce", "bce", "dice", "grad_norm")] for r in records])


def test_two_processes_give_the_losses_of_one(tmp_path, subprocess_env):
    one = tmp_path / "one"
    done = subprocess.run(_train_command(one, "train.steps=3", "optim.micro_batch_size=4",
                                         "data.conversations_per_batch=8"),
                          env=subprocess_env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    two = tmp_path / "two"
    env = dict(subprocess_env, LOG_DIR=str(tmp_path / "logs"), PIXELLM_HEARTBEAT_TIMEOUT=str(HEARTBEAT))
    done = subprocess.run(["bash", str(ROOT / "launch" / "local.sh"), "2", "4",
                           *_train_command(two, "train.steps=3")],
                          env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    logs = "".join(p.read_text()[-3000:] for p in sorted((tmp_path / "logs").glob("*.log")))
    assert done.returncode == 0, logs
    assert "2 process(es)" in logs
    # Process p reads records p, p+2, ...: the global batches hold the same records as one process's.
    two, one = _losses(two), _losses(one)
    np.testing.assert_allclose(two[:, :4], one[:, :4], rtol=1e-5, atol=1e-6)  # total, ce, bce, dice
    # the gradient norm sums squares over devices in another order across two processes
    np.testing.assert_allclose(two[:, 4], one[:, 4], rtol=1e-3)


def test_a_dead_process_makes_the_other_exit_non_zero(tmp_path, subprocess_env):
    out = tmp_path / "run"
    env = dict(subprocess_env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{20000 + os.getpid() % 20000}",
               JAX_NUM_PROCESSES="2", PIXELLM_HEARTBEAT_TIMEOUT=str(HEARTBEAT),
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    procs = [subprocess.Popen(_train_command(out, "train.steps=1000"), env=dict(env, JAX_PROCESS_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        for line in procs[0].stdout:  # process 0 prints a line per optimizer step once training runs
            if line.startswith("step 2/"):
                break
        procs[1].send_signal(signal.SIGKILL)
        start = time.monotonic()
        code = procs[0].wait(timeout=HEARTBEAT + 120)
        assert code != 0
        assert time.monotonic() - start < HEARTBEAT + 120
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
