"""The training loop in this process: the demo end to end (shortened), and non-finite batches."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from pixellm_jax.cli import main as cli_main
from pixellm_jax.config import load_config
from pixellm_jax.eval.loading import load_for_inference
from pixellm_jax.train.checkpoint import Checkpointer
from pixellm_jax.train.loop import NonFiniteError, Trainer
from tests.train.conftest import SMALL


def test_demo_shortened_runs_end_to_end(tmp_path, compile_cache, capsys):
    out = tmp_path / "demo"
    code = cli_main(["train", "--config", "demo", *SMALL, f"train.output_dir={out}", "train.steps=4",
                     "train.eval_every=2", "train.eval_batches=1", "train.save_every=2", "train.overlays=2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "step 4/4" in printed and "eval synthetic @ step 4: gIoU" in printed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for key in ("total", "ce", "bce", "dice", "grad_norm", "lr", "tokens_per_s", "step_seconds"):
        assert all(np.isfinite(r[key]) for r in train), key
    assert train[0]["lr"] == 0.0 and train[1]["lr"] > 0.0  # linear warmup from 0
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4] and all(0.0 <= r["giou"] <= 1.0 for r in evals)
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (out / "overlays").glob("*.png")) == ["overlay_00.png", "overlay_01.png"]
    assert len(json.loads((out / "overlays" / "index.json").read_text())) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and not summary["preempted"] and summary["best_checkpoint"] in (2, 4)
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    # The resolved config records the tokenizer's codebook ids, so the run can be rebuilt from it.
    assert load_config(out / "config.yaml").model.head.seg_token_ids == list(range(640, 642))

    # The trained model, in the conversion layout: evaluation opens it, and a new run starts from it.
    loaded = load_for_inference(out / "model")
    assert loaded.legacy.seg_ids == list(range(640, 642))
    cfg = load_config("demo", [*SMALL, f"train.output_dir={tmp_path / 'next'}", f"train.init_from={out / 'model'}",
                               "train.eval_batches=0"])
    started = Trainer(cfg, echo=lambda _: None)
    final = Checkpointer(out / "checkpoints", cfg.train).restore(4, started.layout)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get((started.state.params, started.frozen)),
                 jax.device_get((final[0].params, final[1])))
    assert int(started.state.step) == 0
    inference = nnx.state(loaded.model, nnx.Param)
    assert np.array_equal(inference["llm"]["lm_head"]["kernel"].get_value(),
                          np.asarray(final[0].params["llm"]["lm_head"]["kernel"].get_value()))


class PoisonedTrainer(Trainer):
    """Feeds NaN pixels on the given micro-batches and remembers the parameters before each one."""

    poisoned: set[int] = set()

    def next_batch(self):
        batch = dict(super().next_batch())
        micro = int(self.state.step) + 1
        self.before = jax.device_get(self.state.params)
        if micro in self.poisoned:
            batch["pixels"] = np.full_like(batch["pixels"], np.nan)
        return batch


def test_nonfinite_batches_are_skipped_counted_and_stop_the_run(tmp_path, compile_cache):
    out = tmp_path / "nan"
    cfg = load_config("demo", [*SMALL, f"train.output_dir={out}", "train.steps=10", "train.eval_batches=0",
                               "train.save_every=0", "train.max_consecutive_nonfinite=3"])
    trainer = PoisonedTrainer(cfg, echo=lambda line: None)
    trainer.poisoned = {2, 5, 6, 7}
    with pytest.raises(NonFiniteError, match=r"3 consecutive micro-batches .* checkpoint 7"):
        trainer.run()
    assert int(trainer.state.skipped) == 4 and int(trainer.state.nonfinite) == 3
    # The checkpoint holds the last good parameters: those from before micro-batch 5.
    restored, _ = Checkpointer(out / "checkpoints", cfg.train).restore(7, trainer.layout)
    last_good = trainer.before  # before micro-batch 7, = before 5, since skipped updates change nothing
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), last_good)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [0, 1, 1, 1, 2, 3]  # steps 1..6 logged; 7 stopped the run
    assert [("total" in r) for r in records] == [True, False, True, True, False, False]  # skips left out
    assert all(np.isfinite(r["total"]) for r in records if "total" in r)
