"""A user's own MUSE-layout data at paths of their choosing: trained on, held out, and every drop counted.

The run goes through the documented config only (dataset specs in `data.datasets` / `data.val`,
relative paths from the working directory), builds its tokenizer from these data, scores two held-out
splits during training (generated answers + Hungarian, and the cheap teacher-forced variant), and
reports what it dropped by reason in metrics.jsonl, summary.json and the progress line.
"""

import json
import re

import numpy as np
import pytest

from pixellm_jax.cli import main as cli_main
from pixellm_jax.data.sample import DROP_REASONS
from tests.muse_layout import write_muse_layout
from tests.train.conftest import SMALL

PLANTED = {"bad_image": 1, "bad_polygon": 1, "seg_mismatch": 1, "too_many_targets": 1, "path_escapes_root": 1}


@pytest.fixture()
def user_data(tmp_path, monkeypatch):
    """Train and val sets under `tmp_path/my data/`; the test runs from `tmp_path/work/`."""
    data = tmp_path / "my data"
    write_muse_layout(data, "train", records=12, seed=0, bad=PLANTED)
    write_muse_layout(data, "val", records=5, seed=1, bad={"bad_image": 1})
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return "../my data"


def test_training_on_muse_layout_data_from_own_paths(user_data, compile_cache, capsys):
    train_spec = f"muse:json={user_data}/train.json,images={user_data}/pics"
    val = f"muse:json={user_data}/val.json,images={user_data}/pics"
    # 9 usable records, 2 per step: 6 steps read the whole first epoch and part of the second.
    code = cli_main(["train", "--config", "demo", *SMALL, "train.output_dir=runs/mine", "train.steps=6",
                     "train.eval_every=3", "train.save_every=3", "model.head.max_targets=3",
                     f"data.datasets=['{train_spec}']", "data.sample_rates=[1.0]",
                     f"data.val=['val={val}', 'val_tf={val},protocol=teacher_forced']",
                     "data.max_drop_fraction=0.6"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    run = json.loads((open("runs/mine/summary.json")).read())

    # The tokenizer was built from these data (their words), and the run says which one it used.
    assert run["tokenizer"].endswith("runs/mine/tokenizer") and run["conversation_lengths"]["conversations"] > 0
    assert "conversation lengths" in printed

    # Every planted reason counted, once per epoch read (the first whole, the second in part).
    dropped = run["data"]["dropped"]
    for reason, n in PLANTED.items():
        assert n <= dropped.get(reason, 0) <= 2 * n, (reason, dropped)
    assert set(dropped) <= set(DROP_REASONS)
    records = [json.loads(line) for line in open("runs/mine/metrics.jsonl")]
    last = [r for r in records if r["kind"] == "train"][-1]
    assert {r: last[f"dropped/{r}"] for r in PLANTED} == {r: dropped[r] for r in PLANTED}
    assert last["bad_samples"] == run["data"]["bad_samples"] and 0 < last["drop_fraction"] < 0.6
    assert "dropped" in printed.split("step 6/6")[1].splitlines()[0]

    # Both held-out splits scored at steps 3 and 6, with their one bad image counted exactly.
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6]
    for e in evals:
        for split in ("val", "val_tf"):
            assert 0.0 <= e[f"{split}/giou"] <= 1.0 and e[f"{split}/targets"] > 0
            assert e[f"{split}/dropped/bad_image"] == 1
        assert e["giou"] == e["val/giou"]  # the first split's metric picks the best checkpoint
        # generated answers: the share with exactly the right targets and the mark-everything floor
        assert 0.0 <= e["val/exact_targets"] <= 1.0 and 0.0 < e["val/baseline_giou"] <= 1.0
        assert "val_tf/exact_targets" not in e
    assert run["best_checkpoint"] in (3, 6) and run["heldout_splits"] == ["val", "val_tf"]
    # overlays of the first split's generated answers: question, numbered answer, reference, IoUs
    overlays = json.load(open("runs/mine/overlays/index.json"))
    assert overlays and all(e["text"].startswith("Q: ") and "\nReference: " in e["text"] for e in overlays)
    assert all(len(e["iou"]) == len(e["targets"]) >= 1 for e in overlays)
    assert "eval val @ step 6" in printed and "eval val_tf @ step 6" in printed
    assert re.search(r"held-out val: gIoU [\d.]+ cIoU [\d.]+, exact targets [\d.]+% \(generated answers\); "
                     r"marking everything: gIoU [\d.]+", printed)
    assert re.search(r"held-out val_tf: gIoU [\d.]+ cIoU [\d.]+ \(\d+ targets\)", printed)

    # The trained model evaluates on the same spec with relative paths, the bad image counted.
    assert cli_main(["eval", "--checkpoint", "runs/mine/model", "--out", "results", "--split", f"v={val}",
                     "--max-new-tokens", "24", "--no-progress"]) == 0
    metrics = json.loads(open("results/metrics.json").read())["v"]
    assert metrics["skipped_samples"] == 1 and metrics["skipped_by_reason"] == {"bad_image": 1}
    records = [json.loads(line) for line in open("results/v.samples.jsonl")]
    exact = [r["num_pred"] == r["num_gt"] and all(p["iou"] >= 0.5 for p in r["pairs"]) for r in records]
    assert metrics["questions"] == len(records) and metrics["exact_targets"] == pytest.approx(np.mean(exact))


def test_a_run_dropping_most_of_its_data_stops_naming_the_reason(user_data, compile_cache, capsys):
    good = f"muse:json={user_data}/train.json,images={user_data}/pics"
    assert cli_main(["build-tokenizer", "--config", "demo", "--out", "tok", f"data.datasets=['{good}']",
                     "data.sample_rates=[1.0]"]) == 0
    wrong = f"muse:json={user_data}/train.json,images=elsewhere"  # every image missing
    run = ["train", "--config", "demo", *SMALL, "train.steps=2", f"data.datasets=['{wrong}']",
           "data.sample_rates=[1.0]", "train.eval_batches=0"]
    capsys.readouterr()
    assert cli_main([*run, "train.output_dir=runs/a", "train.tokenizer=tok"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "most were bad_image" in last and "image file not found" in last and "images=" in last
    # Without a tokenizer the run would build one from these data: the same reason, before any step.
    assert cli_main([*run, "train.output_dir=runs/b"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "bad_image" in last and "images=" in last
