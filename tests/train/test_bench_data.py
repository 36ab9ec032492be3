"""The data benchmark measures the pipeline and the train step of one config in the same run."""

from tests.tools._load import load_tool
from tests.train.conftest import SMALL

bench = load_tool("bench_data")


def test_pipeline_and_step_rates_of_the_demo_config(compile_cache, capsys):
    result = bench.main(["--override", *SMALL, "--workers", "0", "--pipeline-only-sizes", "112",
                         "--batches", "3", "--warmup", "1", "--steps", "2"])
    step = result["train_step"]
    assert step["images_per_step"] == 2 and step["step_seconds"] > 0
    assert step["images_per_s"] == step["images_per_step"] / step["step_seconds"]
    (row,) = result["rows"]
    assert row["image_size"] == 64 and row["workers"] == 0 and row["images_per_s"] > 0
    assert result["ratio_vs_train_step"] == row["images_per_s"] / step["images_per_s"]
    (extra,) = result["pipeline_only"]
    assert extra["image_size"] == 112 and extra["images_per_s"] > 0
    printed = capsys.readouterr().out
    assert "pipeline / train step =" in printed and '"bench": "data_pipeline"' in printed
