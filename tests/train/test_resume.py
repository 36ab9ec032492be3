"""`pixellm train` in subprocesses: kill -9 then resume, and SIGTERM (save, exit 0) then resume,
both end with exactly the parameters and optimizer state of an uninterrupted run."""

import json
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from pixellm_jax.config import load_config
from pixellm_jax.mesh import make_mesh
from pixellm_jax.train.checkpoint import Checkpointer
from pixellm_jax.train.optimizer import make_optimizer
from pixellm_jax.train.state import state_layout
from tests.train.conftest import SMALL

pytestmark = pytest.mark.heavy

STEPS, ACCUM = 10, 2  # 20 micro-batches; checkpoints every optimizer step (every 2 micro-batches)
TIMEOUT = 600


def _command(out, tokenizer=None):
    args = [*SMALL, f"train.output_dir={out}", f"train.steps={STEPS}", f"optim.grad_accum_steps={ACCUM}",
            "train.save_every=1", "train.keep=50", "train.eval_batches=0"]
    if tokenizer:
        args.append(f"train.tokenizer={tokenizer}")
    return [sys.executable, "-m", "pixellm_jax.cli", "train", "--config", "demo", *args]


def _start(out, env, tokenizer=None):
    return subprocess.Popen(_command(out, tokenizer), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _finish(proc):
    output, _ = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, output


def _wait_for_checkpoint(proc, out, step):
    """Block until checkpoint `step` is complete (its directory is renamed into place when it is)."""
    deadline = time.monotonic() + TIMEOUT
    while not (out / "checkpoints" / str(step)).is_dir():
        assert proc.poll() is None, f"run ended before checkpoint {step}: {proc.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, f"no checkpoint {step} after {TIMEOUT}s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, subprocess_env):
    out = tmp_path_factory.mktemp("uninterrupted")
    code, output = _finish(_start(out, subprocess_env))
    assert code == 0, output[-3000:]
    return out


def _restore_final(out):
    cfg = load_config(out / "config.yaml")
    tx = make_optimizer(cfg.optim)
    layout = state_layout(cfg, make_mesh(cfg.mesh), tx)
    ck = Checkpointer(out / "checkpoints", cfg.train)
    assert ck.latest_step() == STEPS * ACCUM
    state, frozen = ck.restore(STEPS * ACCUM, layout)
    ck.close()
    return jax.device_get((state, frozen))


def _assert_same_run(a, b):
    jax.tree.map(np.testing.assert_array_equal, _restore_final(a), _restore_final(b))


def test_kill_9_then_resume_equals_the_uninterrupted_run(tmp_path, subprocess_env, uninterrupted):
    out = tmp_path / "killed"
    proc = _start(out, subprocess_env, uninterrupted / "tokenizer")
    _wait_for_checkpoint(proc, out, 6)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert max(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) < STEPS * ACCUM
    code, output = _finish(_start(out, subprocess_env, uninterrupted / "tokenizer"))
    assert code == 0 and "resumed" in output, output[-3000:]
    _assert_same_run(uninterrupted, out)


def test_sigterm_saves_exits_0_and_resumes_exactly(tmp_path, subprocess_env, uninterrupted):
    out = tmp_path / "preempted"
    proc = _start(out, subprocess_env, uninterrupted / "tokenizer")
    _wait_for_checkpoint(proc, out, 4)
    proc.send_signal(signal.SIGTERM)
    code, output = _finish(proc)
    assert code == 0 and "preemption notice: saved checkpoint" in output, output[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["preempted"] and 4 <= summary["micro_steps"] < STEPS * ACCUM
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == summary["micro_steps"]  # the preemption checkpoint is complete on disk
    code, output = _finish(_start(out, subprocess_env, uninterrupted / "tokenizer"))
    assert code == 0 and f"from checkpoint {summary['micro_steps']}" in output, output[-3000:]
    _assert_same_run(uninterrupted, out)
