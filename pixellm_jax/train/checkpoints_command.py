"""`pixellm checkpoints RUN_DIR`: a run's checkpoint steps with their metrics and verification status.

Each step is restored onto this host (in the run's layout on the local devices' mesh) and its arrays
checked against the checksums saved with it, so "verified" means a resume from it would succeed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pixellm_jax.config import ConfigError, load_config


def checkpoints_command(args: argparse.Namespace) -> int:
    """Print one line per step (newest first); exit 1 when any step is corrupt."""
    from pixellm_jax.mesh import make_mesh
    from pixellm_jax.train.checkpoint import Checkpointer
    from pixellm_jax.train.optimizer import make_optimizer
    from pixellm_jax.train.state import state_layout

    run = Path(args.run_dir)
    config = run / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"{run}: not a training run directory (no config.yaml)")
    cfg = load_config(config)
    directory = run / "checkpoints"
    checkpointer = Checkpointer(directory, cfg.train)
    try:
        steps = sorted(checkpointer.all_steps(), reverse=True)
        if not steps:
            print(f"{directory}: no checkpoints")
            return 0
        tx = make_optimizer(cfg.optim)
        layout = state_layout(cfg, make_mesh(cfg.mesh), tx) if args.verify else None
        corrupt = 0
        print(f"{'step':>8}  {'status':<28}  metrics")
        for step in steps:
            status = checkpointer.verify(step, layout) if args.verify else "not verified (--no-verify)"
            corrupt += status.startswith("corrupt")
            metrics = checkpointer.manager.metrics(step)
            print(f"{step:>8}  {status:<28}  {json.dumps(metrics) if metrics else '-'}")
        best = checkpointer.best_step()
        print(f"latest {steps[0]}, best by {cfg.train.eval_metric}: {best if best is not None else '-'}")
        return 1 if corrupt else 0
    finally:
        checkpointer.close()
