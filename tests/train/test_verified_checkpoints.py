"""Training state that is what it claims: finite after every update, checkpoints verified on restore,
a corrupt newest checkpoint set aside and the run resumed from the one before."""

import os

import jax
import numpy as np
import pytest

from pixellm_jax.cli import main as cli_main
from pixellm_jax.config import load_config
from pixellm_jax.train.checkpoint import Checkpointer, CorruptCheckpoint
from pixellm_jax.train.checksums import all_finite
from pixellm_jax.train.loop import NonFiniteError, Trainer
from tests.train.conftest import SMALL

QUIET = {"echo": lambda _: None}


def _cfg(out, *extra):
    return load_config("demo", [*SMALL, f"train.output_dir={out}", "train.eval_batches=0", *extra])


def test_an_overflowing_update_is_rejected_and_the_named_checkpoint_is_finite(tmp_path, compile_cache):
    out = tmp_path / "run"
    # 1e39 overflows float32: from the first warmed-up step every update makes the weights infinite
    # although loss and gradient are finite.
    cfg = _cfg(out, "optim.learning_rate=1e39", "optim.warmup_steps=2", "train.steps=30",
               "train.max_consecutive_nonfinite=3", "train.save_every=0")
    trainer = Trainer(cfg, **QUIET)
    with pytest.raises(NonFiniteError, match=r"verified finite\) are in checkpoint (\d+)") as stop:
        trainer.run()
    step = int(stop.value.args[0].split("are in checkpoint ")[1].split()[0])
    assert int(trainer.state.skipped) == 3 and all_finite((trainer.state.params, trainer.state.opt_state))
    state, _ = Checkpointer(out / "checkpoints", cfg.train).restore(step, trainer.layout)
    assert all_finite((state.params, state.opt_state))
    # A restart with a sane learning rate continues from it and trains on.
    resumed = Trainer(_cfg(out, "optim.learning_rate=1e-3", "train.steps=5", "train.save_every=0"), **QUIET)
    assert int(resumed.state.step) == step
    result = resumed.run()
    assert result.micro_steps == 5 and all_finite(resumed.state.params)


def test_the_update_ratio_guard_rejects_a_huge_but_finite_update(tmp_path, compile_cache):
    cfg = _cfg(tmp_path / "run", "optim.learning_rate=1e10", "optim.warmup_steps=1", "train.steps=4",
               "train.max_update_ratio=1.0", "train.max_consecutive_nonfinite=2", "train.save_every=0")
    trainer = Trainer(cfg, **QUIET)
    before = jax.device_get(trainer.state.params)
    with pytest.raises(NonFiniteError):
        trainer.run()
    jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(trainer.state.params))


def _damage(step_dir, how):
    """Overwrite 4 KB of the largest array file of a step with random bytes, or truncate it."""
    files = [p for p in step_dir.rglob("*") if p.is_file() and "state" in p.parts]
    target = max(files, key=lambda p: p.stat().st_size)
    size = target.stat().st_size
    if how == "random":
        with open(target, "r+b") as f:
            f.seek(size // 4)
            f.write(np.random.default_rng(0).bytes(min(4096, size // 2)))
    else:
        os.truncate(target, size // 3)


@pytest.mark.parametrize("how", ["random", "truncated"])
def test_a_corrupt_latest_checkpoint_is_set_aside_and_the_run_resumes_from_the_previous(
        tmp_path, compile_cache, capsys, how):
    out = tmp_path / "run"
    base = ["train", "--config", "demo", *SMALL, f"train.output_dir={out}", "train.eval_batches=0",
            "train.save_every=2", "train.keep=3"]
    assert cli_main([*base, "train.steps=4"]) == 0
    _damage(out / "checkpoints" / "4", how)
    capsys.readouterr()
    # The listing says which step is bad; exit 1.
    assert cli_main(["checkpoints", str(out)]) == 1
    listing = capsys.readouterr().out
    assert "corrupt" in [line.split()[1] for line in listing.splitlines() if line.split()[:1] == ["4"]][0]
    assert "verified" in [line for line in listing.splitlines() if line.split()[:1] == ["2"]][0]
    # Asking for the bad step by name fails rather than falling back.
    cfg = _cfg(out, "train.resume_step=4")
    with pytest.raises(CorruptCheckpoint, match="checkpoint 4 is corrupt"):
        Trainer(cfg, **QUIET)
    # The run resumes from step 2; step 4 is kept beside, not deleted.
    assert cli_main([*base, "train.steps=5"]) == 0
    printed = capsys.readouterr().out
    assert "checkpoint 4 is corrupt" in printed and "resumed" in printed and "from checkpoint 2" in printed
    aside = list((out / "checkpoints.set_aside").iterdir())
    assert len(aside) == 1 and aside[0].name.startswith("4-")
    assert sorted(Checkpointer(out / "checkpoints", cfg.train).all_steps())[-1] == 5


def test_resume_step_picks_a_checkpoint(tmp_path, compile_cache):
    out = tmp_path / "run"
    assert cli_main(["train", "--config", "demo", *SMALL, f"train.output_dir={out}", "train.eval_batches=0",
                     "train.save_every=1", "train.keep=3", "train.steps=3"]) == 0
    trainer = Trainer(_cfg(out, "train.resume_step=1", "train.steps=3"), **QUIET)
    assert int(trainer.state.step) == 1
    with pytest.raises(Exception, match="train.resume_step: no checkpoint 7"):
        Trainer(_cfg(out, "train.resume_step=7"), **QUIET)
