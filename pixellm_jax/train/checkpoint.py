"""Orbax checkpoints of a training run: one step holds the train state, the frozen part and the
input pipeline's position, so a resume continues exactly where the run stopped.

Layout: `<output_dir>/checkpoints/<step>/{state,frozen,data}`, step = micro-batches consumed.
Saves are asynchronous (the step loop goes on while the arrays are written) and atomic (a step
directory appears only when complete, so a run killed mid-save resumes from the previous one).
Kept: the latest `train.keep` steps and the best one by `train.eval_metric`. Restoring takes the
target layout, so a checkpoint written on one mesh restores onto any other mesh shape.
At the end of a run the model alone is also written in the conversion layout (`write_model`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from pixellm_jax.config import Config, TrainConfig
from pixellm_jax.convert.checkpoint import type_handler_registry
from pixellm_jax.train.state import StateLayout, TrainState, abstract_with_shardings


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
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=options,
            item_handlers={
                "state": ocp.PyTreeCheckpointHandler(type_handler_registry=registry),
                "frozen": ocp.PyTreeCheckpointHandler(type_handler_registry=registry),
                "data": grain.checkpoint.CheckpointHandler(),
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
        """Start saving `step` (returns once the arrays are copied off the devices' live buffers)."""
        items = {"state": ocp.args.PyTreeSave(state._asdict()), "frozen": ocp.args.PyTreeSave(frozen)}
        if iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(iterator)
        if metrics is not None and self.metric not in metrics:
            metrics = None
        self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

    def restore(self, step: int, layout: StateLayout, iterator: Any = None) -> tuple[TrainState, Any]:
        """(state, frozen) of `step` placed in `layout`'s shardings; `iterator` is set to its position."""
        state_target = abstract_with_shardings(layout.abstract_state, layout.state_shardings)._asdict()
        frozen_target = abstract_with_shardings(layout.abstract_frozen, layout.frozen_shardings)
        items = {"state": _restore_args(state_target), "frozen": _restore_args(frozen_target)}
        if iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return TrainState(**restored["state"]), restored["frozen"]

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
