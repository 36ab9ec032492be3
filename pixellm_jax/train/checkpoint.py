"""Orbax checkpoints of a training run: one step holds the train state, the frozen part and the
input pipeline's position, so a resume continues exactly where the run stopped.

Layout: `<output_dir>/checkpoints/<step>/{state,frozen,data}`, step = micro-batches consumed.
Saves are asynchronous (the step loop goes on while the arrays are written) and atomic (a step
directory appears only when complete, so a run killed mid-save resumes from the previous one).
Kept: the latest `train.keep` steps and the best one by `train.eval_metric`. Restoring takes the
target layout, so a checkpoint written on one mesh restores onto any other mesh shape.
Verified: every step records the checksum of each of its arrays (`checksums.py`, item `checksums`)
and is written only from a finite state; restoring recomputes the checksums and raises
`CorruptCheckpoint` when a file fails to decode or an array differs. `set_aside` moves such a step
out of the way (to `<output_dir>/checkpoints.set_aside/`, never deleted), so the run can resume
from the newest step that verifies.
At the end of a run the model alone is also written in the conversion layout (`write_model`).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, NamedTuple

import grain
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from pixellm_jax.config import Config, TrainConfig
from pixellm_jax.convert.checkpoint import type_handler_registry
from pixellm_jax.train.checksums import all_finite, checksums, mismatches
from pixellm_jax.train.state import StateLayout, TrainState, abstract_with_shardings

CHECKSUMS = "checksums"


class CorruptCheckpoint(RuntimeError):
    """A checkpoint step that cannot be read back, or whose arrays differ from what was saved."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"checkpoint {step} is corrupt: {reason}")
        self.step, self.reason = step, reason


class NonFiniteState(RuntimeError):
    """A state with NaN or Inf values was about to be saved as a checkpoint."""


class StepStatus(NamedTuple):
    """One step as `pixellm checkpoints` lists it."""

    step: int
    metrics: dict | None
    status: str  # "verified", "unverified (no checksums)" or "corrupt: <reason>"


def _restore_args(target: Any) -> ocp.args.PyTreeRestore:
    """Restore every array of `target` (ShapeDtypeStructs with shardings) into its sharding."""
    return ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))


class Checkpointer:
    """Save and restore (train state, frozen state, data iterator) steps under `directory`."""

    def __init__(self, directory: str | Path, cfg: TrainConfig):
        self.metric = cfg.eval_metric
        policy = pp.AnyPreservationPolicy([
            pp.LatestN(n=cfg.keep),
            pp.BestN(get_metric_fn=lambda m: m[self.metric], reverse=False, n=1,
                     keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=cfg.async_checkpointing,
            preservation_policy=policy,
            best_fn=lambda m: m[self.metric],  # also makes Orbax store each step's metrics with it
            best_mode="max",
            cleanup_tmp_directories=True,
            create=True,
        )
        registry = type_handler_registry()
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.PyTreeCheckpointHandler(type_handler_registry=registry),
                "frozen": ocp.PyTreeCheckpointHandler(type_handler_registry=registry),
                "data": grain.checkpoint.CheckpointHandler(),
                CHECKSUMS: ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def best_step(self) -> int | None:
        """The kept step with the highest `train.eval_metric` (None when no kept step was evaluated)."""
        scored = [(m[self.metric], step) for step in self.all_steps() if (m := self.manager.metrics(step))]
        return max(scored)[1] if scored else None

    def save(self, step: int, state: TrainState, frozen: Any, iterator: Any = None,
             metrics: dict[str, float] | None = None) -> None:
        """Start saving `step` (returns once the arrays are copied off the devices' live buffers).

        Refuses (`NonFiniteState`) a state whose trainable parameters or optimizer state hold NaN/Inf.
        """
        if not all_finite((state.params, state.opt_state)):
            raise NonFiniteState(f"refusing to save checkpoint {step}: the state holds non-finite values")
        tree = {"state": state._asdict(), "frozen": frozen}
        items = {"state": ocp.args.PyTreeSave(tree["state"]), "frozen": ocp.args.PyTreeSave(frozen),
                 CHECKSUMS: ocp.args.JsonSave(checksums(tree))}
        if iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(iterator)
        if metrics is not None and self.metric not in metrics:
            metrics = None
        self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

    def restore(self, step: int, layout: StateLayout, iterator: Any = None) -> tuple[TrainState, Any]:
        """(state, frozen) of `step` placed in `layout`'s shardings, verified against its checksums;
        `iterator` is set to its position. Raises `CorruptCheckpoint` naming the first bad array."""
        state_target = abstract_with_shardings(layout.abstract_state, layout.state_shardings)._asdict()
        frozen_target = abstract_with_shardings(layout.abstract_frozen, layout.frozen_shardings)
        items = {"state": _restore_args(state_target), "frozen": _restore_args(frozen_target)}
        verifiable = (self.directory / str(step) / CHECKSUMS).exists()
        if verifiable:
            items[CHECKSUMS] = ocp.args.JsonRestore()
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # TensorStore / OCDBT / JSON raise many types for damaged files
            raise CorruptCheckpoint(step, f"cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:300]})") from e
        tree = {"state": restored["state"], "frozen": restored["frozen"]}
        if verifiable:
            bad = mismatches(tree, restored[CHECKSUMS])
            if bad:
                raise CorruptCheckpoint(step, f"{len(bad)} array(s) differ from what was saved, e.g. {bad[0]}")
        if iterator is not None:  # set only from a verified step
            self.manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(iterator)))
        return TrainState(**restored["state"]), restored["frozen"]

    def verify(self, step: int, layout: StateLayout) -> str:
        """"verified", "unverified (no checksums)" or "corrupt: <reason>" for one step."""
        try:
            self.restore(step, layout)
        except CorruptCheckpoint as e:
            return f"corrupt: {e.reason}"
        return "verified" if (self.directory / str(step) / CHECKSUMS).exists() else "unverified (no checksums)"

    def statuses(self, layout: StateLayout) -> list[StepStatus]:
        """Every step with its metrics and verification status, newest first."""
        return [StepStatus(step, self.manager.metrics(step), self.verify(step, layout))
                for step in sorted(self.all_steps(), reverse=True)]

    def set_aside(self, step: int) -> Path:
        """Move a (corrupt) step out of the checkpoint directory, keeping it; returns where it went."""
        aside = self.directory.parent / f"{self.directory.name}.set_aside"
        aside.mkdir(parents=True, exist_ok=True)
        target = aside / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
        shutil.move(str(self.directory / str(step)), str(target))
        self.manager.reload()
        return target

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def write_model(directory: str | Path, layout: StateLayout, state: TrainState, frozen: Any, cfg: Config,
                hf_tokenizer: Any) -> Path:
    """The trained model as a `pixellm convert`-layout checkpoint (params/, config.yaml, tokenizer/):
    what `pixellm eval`, `pixellm predict`, `pixellm export` and another run's `train.init_from` open.

    Written beside `directory` and renamed into place (replacing an older one); every process writes
    its shards.
    """
    from flax import nnx

    from pixellm_jax.convert.checkpoint import model_params, staged_output, write_checkpoint

    model = nnx.merge(layout.graphdef, state.params, state.rngs, frozen)
    report = {"source": "pixellm train", "micro_steps": int(state.step), "output_dir": str(cfg.train.output_dir)}
    with staged_output(directory, force=True) as stage:
        write_checkpoint(stage, model_params(model), cfg, report=report, write_tokenizer=hf_tokenizer.save_pretrained)
    return Path(directory)
