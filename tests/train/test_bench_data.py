"""The data benchmark measures the pipeline and the train step of one config in the same run."""

from tests.tools._load import load_tool
from tests.train.conftest import SMALL

bench = load_tool("bench_data")


def test_pipeline_and_step_rates_of_the_demo_config(compile_cache, capsys):
    result = bench.main(["--override", *SMALL, "--workers", "0", "--pipeline-only-sizes", "112",
                         "--batches", "3", "--warmup", "1", "--steps", "2", "--rounds", "2"])
    step = result["train_step"]
    assert step["images_per_step"] == 2 and step["step_seconds"] > 0
    assert step["images_per_s"] == step["images_per_step"] / step["step_seconds"]
    (row,) = result["rows"]
    assert row["image_size"] == 64 and row["workers"] == 0 and row["images_per_s"] > 0
    assert result["ratio_vs_train_step"] == row["images_per_s"] / step["images_per_s"]
    # interleaved: two rounds of (2 train steps, 3 pipeline batches), medians and per-round ratios
    assert step["seconds"]["n"] == 4 and len(row["images_per_s_rounds"]) == 2
    assert row["paired_ratio"]["min"] <= row["paired_ratio"]["max"]
    assert {"load_before", "load_after", "idle", "pinned"} <= set(result)
    (extra,) = result["pipeline_only"]
    assert extra["image_size"] == 112 and extra["images_per_s"] > 0
    printed = capsys.readouterr().out
    assert "pipeline / train step =" in printed and '"bench": "data_pipeline"' in printed
