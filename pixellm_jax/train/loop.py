"""The training loop behind `pixellm train`: build or resume, step, log, evaluate, save, stop.

One optimizer step is `optim.grad_accum_steps` micro-batches (each one jitted step call); the run
lasts `train.steps` optimizer steps (0: `optim.total_steps`). Every `train.log_every` steps the mean
loss terms, gradient norm, learning rate, tokens/s, step time and MFU go to the terminal and to
`metrics.jsonl` / TensorBoard, with what the input pipeline dropped by reason (`dropped/<reason>`,
`drop_fraction`; past `data.max_drop_fraction` the run stops naming the dominant reason); every
`train.eval_every` steps (and at the end) the held-out splits are scored (`heldout.py`: `data.val`, or
held-out synthetic scenes when the run trains on synthetic data); every
`train.save_every` steps (and at the end) a checkpoint is started. After each micro-batch the loop
reads its metrics (a small device-to-host copy), which lets it react at once to a non-finite loss
and to a preemption notice:
  * a skipped (non-finite) micro-batch is logged and counted; `train.max_consecutive_nonfinite` in a
    row save a checkpoint of the state (whose parameters are the last good ones, since skipped
    updates change nothing) and raise `NonFiniteError`;
  * SIGTERM saves the current step, waits for the write, and returns with `preempted=True`.
A finished run also writes `<output_dir>/model`, the trained model in the conversion layout (for
`pixellm eval`, `predict`, `export` and `train.init_from`). A run restarted with the same output_dir resumes from its latest checkpoint (`train.resume`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from pixellm_jax.config import Config, ConfigError, dump_config, resolve_paths
from pixellm_jax.data.pipeline import NothingUsable, PipelineConfig, TooManyDropped
from pixellm_jax.data.token_lengths import conversation_lengths, describe, length_report
from pixellm_jax.errors import writing
from pixellm_jax.mesh import make_mesh
from pixellm_jax.train import distributed
from pixellm_jax.train.checkpoint import Checkpointer, CorruptCheckpoint, write_model
from pixellm_jax.train.data import load_tokenizer, tokenizer_directory, training_pipeline, with_tokenizer_ids
from pixellm_jax.train.heldout import HeldOut, NothingScoredInValidation
from pixellm_jax.train.mesh import batch_groups, batch_shardings, global_batch
from pixellm_jax.train.metrics import MetricsWriter, peak_flops, step_flops
from pixellm_jax.train.optimizer import make_optimizer
from pixellm_jax.train.preemption import PreemptionWatch
from pixellm_jax.train.state import init_state, state_layout
from pixellm_jax.train.step import make_train_step
from pixellm_jax.train.overlays import write_answer_overlays, write_overlays
from pixellm_jax.train.validation import make_eval_step

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many consecutive micro-batches with a non-finite loss or gradient."""


@dataclasses.dataclass
class TrainResult:
    micro_steps: int  # micro-batches consumed in total (the checkpoint step)
    steps: int  # optimizer steps (micro_steps // grad_accum_steps)
    eval_metrics: dict[str, float]  # of the last evaluation ({} when none ran)
    preempted: bool
    skipped: int  # micro-batches skipped for non-finite values
    wall_seconds: float  # this invocation, start-up and compilation included
    data: dict = dataclasses.field(default_factory=dict)  # what the input pipeline kept and dropped, by reason


class Trainer:
    """A training run set up from a config: mesh, state (fresh or resumed), data, step, outputs."""

    def __init__(self, cfg: Config, echo: Callable[[str], None] | None = None):
        cfg = resolve_paths(cfg)  # relative paths mean the working directory's, wherever they are used later
        self.started = time.perf_counter()
        self._compiled: set = set()
        distributed.initialize(cfg.train.distributed)
        if cfg.train.compilation_cache:
            jax.config.update("jax_compilation_cache_dir", str(Path(cfg.train.compilation_cache).absolute()))
        self.primary = jax.process_index() == 0
        self.echo = echo or (functools.partial(print, flush=True) if self.primary else (lambda _: None))
        self.out = Path(cfg.train.output_dir)
        with writing(self.out):
            self.out.mkdir(parents=True, exist_ok=True)
        self.hf_tokenizer, tokenizer = load_tokenizer(cfg, self.out)
        self.cfg = cfg = with_tokenizer_ids(cfg, self.hf_tokenizer, tokenizer)
        self.tokenizer_dir = tokenizer_directory(cfg, self.out)
        if self.primary:
            (self.out / "config.yaml").write_text(dump_config(cfg))
        self.accum = cfg.optim.grad_accum_steps
        self.image_tokens = cfg.model.projector.llm_grid ** 2 - 1  # LLM positions an image adds to its text
        self.total_steps = cfg.train.steps or cfg.optim.total_steps
        self.mesh = make_mesh(cfg.mesh)
        self.tx = make_optimizer(cfg.optim)
        self.layout = state_layout(cfg, self.mesh, self.tx)
        pc = PipelineConfig.from_config(cfg)
        processes = jax.process_count()
        self.shardings = batch_shardings(self.mesh, pc.images_per_batch * processes,
                                         pc.conversations_per_batch * processes)
        # Batches packed in one block per device, so each conversation's image is on its device.
        local_groups, groups = batch_groups(self.mesh, pc.images_per_batch, pc.conversations_per_batch)
        self.train_step = make_train_step(self.layout, cfg, self.tx, self.mesh, self.shardings, groups)
        self.pipeline = training_pipeline(cfg, tokenizer, local_groups)
        self.iterator = iter(self.pipeline)
        self.lengths = length_report(
            conversation_lengths(self.pipeline.sources, tokenizer, cfg.data.use_im_start_end, seed=cfg.seed),
            cfg.data.token_buckets, pc.max_text_len)
        self.echo(f"tokenizer {self.tokenizer_dir} ({len(self.hf_tokenizer)} tokens); {describe(self.lengths)}")
        self.heldout = HeldOut(cfg, self.layout, tokenizer, self.hf_tokenizer, local_groups)
        self.eval_step = (make_eval_step(self.layout, cfg, self.mesh, self.shardings, groups)
                          if any(s.protocol == "teacher_forced" for s in self.heldout.splits) else None)
        self.checkpointer = Checkpointer(self.out / "checkpoints", cfg.train)
        self.writer = MetricsWriter(self.out)
        self.peak = peak_flops(cfg)
        restored = self._resume() if cfg.train.resume else None
        if restored is None:
            _, self.state, self.frozen = init_state(cfg, self.mesh, self.tx, self.layout)
            self.echo(f"initialised a new run in {self.out} ({self._describe()})")
        else:
            self.echo(f"resumed {self.out} from checkpoint {restored} ({self._describe()})")

    def _resume(self) -> int | None:
        """Restore `train.resume_step`, or the newest checkpoint that verifies; a corrupt newer one is
        reported in one line and set aside. None when there is nothing to resume from."""
        wanted = self.cfg.train.resume_step
        steps = sorted(self.checkpointer.all_steps(), reverse=True)
        if wanted >= 0:
            if wanted not in steps:
                raise ConfigError(f"train.resume_step: no checkpoint {wanted} in {self.checkpointer.directory} "
                                  f"(have {sorted(steps)})")
            steps = [wanted]
        for step in steps:
            try:
                self.state, self.frozen = self.checkpointer.restore(step, self.layout, self.iterator)
                return step
            except CorruptCheckpoint as e:
                if wanted >= 0:
                    raise
                where = self.checkpointer.set_aside(step) if self.primary else None
                distributed.barrier(f"pixellm set aside {step}")
                if not self.primary:
                    self.checkpointer.manager.reload()
                self.echo(f"{e}; set aside{f' in {where}' if where else ''}, trying the previous one")
        return None

    def _describe(self) -> str:
        m = self.mesh.shape
        return (f"mesh data={m['data']} fsdp={m['fsdp']} tensor={m['tensor']}, "
                f"{jax.process_count()} process(es), {self.total_steps} steps x {self.accum} micro-batches")

    def next_batch(self) -> dict:
        """The next host-local training batch."""
        return next(self.iterator)

    def save(self, metrics: dict[str, float] | None = None, wait: bool = False) -> int:
        step = int(self.state.step)
        if step not in self.checkpointer.all_steps():
            self.checkpointer.save(step, self.state, self.frozen, self.iterator, metrics)
        if wait:
            self.checkpointer.wait()
        return step

    def run(self) -> TrainResult:
        cfg, tc = self.cfg, self.cfg.train
        total_micro = self.total_steps * self.accum
        window: list[dict[str, float]] = []
        tokens = 0
        flops = 0.0
        eval_metrics: dict[str, float] = {}
        preempted = False
        window_start = time.perf_counter()
        progress = self._progress(int(self.state.step) // self.accum)
        try:
            with PreemptionWatch() as watch:
                while int(self.state.step) < total_micro:
                    if watch.requested():
                        step = self.save(wait=True)
                        self.echo(f"preemption notice: saved checkpoint {step}, exiting")
                        preempted = True
                        break
                    local = self.next_batch()
                    batch = global_batch(local, self.shardings)
                    self.state, metrics = self._together(self.train_step)(self.state, self.frozen, batch)
                    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    micro = int(self.state.step)
                    self._check_finite(host, micro)
                    window.append(host)
                    n = jax.process_count()
                    tokens += n * (int(local["attention_mask"].sum()) + self.image_tokens * int(local["conv_valid"].sum()))
                    flops += step_flops(cfg, n * local["pixels"].shape[0], n * local["input_ids"].shape[0],
                                        local["input_ids"].shape[1])
                    if micro % self.accum:
                        continue
                    step = micro // self.accum
                    progress.update(1)
                    last = micro == total_micro
                    if step % tc.log_every == 0 or last:
                        elapsed = time.perf_counter() - window_start
                        self._log(step, window, tokens, flops, elapsed, progress)
                        window, tokens, flops, window_start = [], 0, 0.0, time.perf_counter()
                    evaluated = None
                    if self.heldout and ((tc.eval_every and step % tc.eval_every == 0) or last):
                        eval_metrics = evaluated = self._evaluate(step, progress, overlays=last)
                        window_start = time.perf_counter()
                    if (tc.save_every and step % tc.save_every == 0) or last:
                        self.save(evaluated)
        finally:
            progress.close()
            self.checkpointer.wait()
            best = self.checkpointer.best_step()
            self.checkpointer.close()
            self.writer.close()
        if not preempted:
            path = write_model(self.out / "model", self.layout, self.state, self.frozen, self.cfg, self.hf_tokenizer)
            self.echo(f"wrote the trained model to {path} (pixellm eval / predict / export --checkpoint {path})")
        result = TrainResult(int(self.state.step), int(self.state.step) // self.accum, eval_metrics, preempted,
                             int(self.state.skipped), time.perf_counter() - self.started, self._data_counts())
        if self.primary:
            summary = dataclasses.asdict(result) | {
                "best_checkpoint": best, "tokenizer": str(self.tokenizer_dir), "conversation_lengths": self.lengths,
                "heldout_splits": self.heldout.names}
            tmp = self.out / "summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2))
            tmp.rename(self.out / "summary.json")
        return result

    def _data_counts(self) -> dict:
        """This invocation's pipeline counters: kept conversations, bad samples, drops by reason."""
        stats = self.pipeline.stats
        return {"kept_conversations": stats.conversations, "bad_samples": stats.bad_samples,
                "dropped": dict(stats.dropped), "drop_fraction": stats.drop_fraction,
                "samples_without_conversations": stats.samples_without_conversations}

    def _together(self, fn):
        """`fn` that, with several processes, is first compiled for each new batch shape and then waits
        for every process: the first cross-process collective of a program (Gloo on CPU) gives up
        after 30 s, so no process may start running it while another is still compiling it."""

        if jax.process_count() == 1:
            return fn

        def call(*args):
            key = (id(fn), tuple((k, v.shape) for k, v in sorted(args[-1].items())))
            if key not in self._compiled:
                fn.lower(*args).compile()
                self._compiled.add(key)
                distributed.barrier(f"pixellm compiled {len(self._compiled)}")
            return fn(*args)

        return call

    def _check_finite(self, host: dict[str, float], micro: int) -> None:
        if host["finite"]:
            return
        run, skipped = int(self.state.nonfinite), int(self.state.skipped)
        self.echo(f"micro-batch {micro}: update rejected: non-finite loss, gradient or updated state, or an update "
                  f"over train.max_update_ratio (loss {host['total']}, grad norm {host['grad_norm']}"
                  + (f", update ratio {host['update_ratio']}" if "update_ratio" in host else "")
                  + f"); the state is kept ({run} in a row, {skipped} in all)")
        if run >= self.cfg.train.max_consecutive_nonfinite:
            step = self.save(wait=True)
            raise NonFiniteError(
                f"{run} consecutive micro-batches were rejected (the last is micro-batch "
                f"{micro}; train.max_consecutive_nonfinite={self.cfg.train.max_consecutive_nonfinite}). "
                f"The last good parameters (verified finite) are in checkpoint {step} under {self.out / 'checkpoints'}.")

    def _log(self, step: int, window: list[dict[str, float]], tokens: int, flops: float, elapsed: float,
             progress) -> None:
        good = [w for w in window if w["finite"]]  # skipped micro-batches are left out of the means
        mean = {k: float(np.mean([w[k] for w in good])) for k in window[0] if k != "finite"} if good else {}
        mean["lr"] = window[-1]["lr"]
        mean["tokens_per_s"] = tokens / elapsed
        mean["step_seconds"] = elapsed / len(window) * self.accum
        mean["skipped"] = float(self.state.skipped)
        mean.update(self.pipeline.stats.as_metrics())
        if self.peak:
            mean["mfu"] = flops / elapsed / (self.peak * jax.device_count())
        self.writer.write(step, mean)
        mfu = f" | mfu {mean['mfu']:.1%}" if "mfu" in mean else ""
        losses = (f"loss {mean['total']:.4f} (ce {mean['ce']:.3f} bce {mean['bce']:.3f} dice {mean['dice']:.3f}) | "
                  f"grad norm {mean['grad_norm']:.3f}" if good else "every micro-batch skipped")
        dropped = sum(self.pipeline.stats.dropped.values())
        drops = f" | dropped {dropped} ({mean['drop_fraction']:.1%})" if dropped else ""
        progress.write(f"step {step}/{self.total_steps} | {losses} | lr {mean['lr']:.2e} | "
                       f"{mean['tokens_per_s']:.0f} tok/s | {mean['step_seconds']:.3f} s/step{mfu}{drops}")

    def _evaluate(self, step: int, progress, overlays: bool) -> dict[str, float]:
        # teacher-forced splits keep batches (one holds enough conversations), generated ones answers
        generated = bool(self.heldout) and self.heldout.splits[0].protocol == "generate"
        keep = (self.cfg.train.overlays if generated else 1) if overlays and self.cfg.train.overlays else 0
        eval_step = self._together(self.eval_step) if self.eval_step is not None else None
        metrics, kept = self.heldout.evaluate(eval_step, self.state, self.frozen, self.shardings, keep)
        self.writer.write(step, metrics, kind="eval")
        for name in self.heldout.names:
            m = split_metrics(metrics, name)
            loss = f" val loss {m['val_loss']:.4f}" if "val_loss" in m else ""
            dropped = f", {m['dropped']:.0f} dropped" if m.get("dropped") else ""
            exact = f" exact targets {m['exact_targets']:.1%}" if "exact_targets" in m else ""
            base = f" (marking everything: {m['baseline_giou']:.4f})" if "baseline_giou" in m else ""
            progress.write(f"eval {name} @ step {step}: gIoU {m['giou']:.4f}{base} cIoU {m['ciou']:.4f}{exact}{loss} "
                           f"({m['targets']:.0f} targets{dropped})")
        if kept and self.primary:
            if generated:
                paths = write_answer_overlays(self.out / "overlays", kept, self.cfg.train.overlays)
            else:
                paths = write_overlays(self.out / "overlays", kept, self.hf_tokenizer, self.cfg.train.overlays,
                                       self.cfg.data.normalization)
            progress.write(f"wrote {len(paths)} mask overlays to {self.out / 'overlays'}")
        return metrics

    def _progress(self, initial: int):
        return _Progress(self.total_steps, initial, self.echo,
                         enabled=self.cfg.train.progress and self.primary and sys.stdout.isatty())


class _Progress:
    """A tqdm bar on a terminal; plain lines otherwise."""

    def __init__(self, total: int, initial: int, echo: Callable[[str], None], enabled: bool):
        self.echo = echo
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            self.echo(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(cfg: Config) -> TrainResult:
    """Run (or resume) the training run `cfg` describes."""
    return Trainer(cfg).run()


def main(config: str, overrides: list[str]) -> int:
    """`pixellm train`: 0 when finished or preempted (saved), 3 when stopped by non-finite values."""
    from pixellm_jax.config import load_config

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = resolve_paths(load_config(config, overrides))
    try:
        result = train(cfg)
    except NonFiniteError as e:
        print(f"pixellm train: {e}", file=sys.stderr)
        return 3
    except (NothingUsable, TooManyDropped, NothingScoredInValidation, CorruptCheckpoint) as e:
        print(f"pixellm train: {e}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        status = "preempted, checkpoint saved" if result.preempted else "done"
        print(f"{status}: {result.steps} steps in {result.wall_seconds:.1f}s; outputs in {cfg.train.output_dir}")
        for line in heldout_lines(result.eval_metrics):
            print(line)
    return 0


def split_metrics(metrics: dict[str, float], name: str) -> dict[str, float]:
    """One held-out split's metrics out of the flat `<split>/<metric>` ones, without the prefix."""
    return {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(f"{name}/")}


def heldout_lines(metrics: dict[str, float]) -> list[str]:
    """One line per held-out split of the last evaluation: gIoU, cIoU and, for generated answers, the
    share of answers with exactly the right targets and the mark-everything baseline."""
    splits = dict.fromkeys(k.split("/", 1)[0] for k in metrics if "/" in k)
    lines = []
    for name in splits:
        m = split_metrics(metrics, name)
        if "giou" not in m:
            continue
        line = f"held-out {name}: gIoU {m['giou']:.4f} cIoU {m['ciou']:.4f}"
        if "exact_targets" in m:
            line += f", exact targets {m['exact_targets']:.1%} (generated answers)"
        if "baseline_giou" in m:
            line += f"; marking everything: gIoU {m['baseline_giou']:.4f}"
        lines.append(line + f" ({m['targets']:.0f} targets)")
    return lines
