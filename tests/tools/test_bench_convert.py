"""Smoke test of the converter benchmark on a small generated release: it runs, converts and reports."""

import json

import pytest

from tests.tools._load import load_tool

bench = load_tool("bench_convert")


def test_bench_convert_reports_medians_of_alternating_runs(tmp_path, capsys):
    assert bench.main(["--size-gb", "0.03", "--hidden", "256", "--shard-gb", "0.01", "--repeats", "2",
                       "--dir", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["files"] >= 3  # several shards plus the CLIP file
    assert len(report["read_times"]) == len(report["stream_times"]) == 2
    assert report["read_s"] == pytest.approx(sum(report["read_times"]) / 2, abs=2e-3)  # the median of two
    assert 0 < report["throughput_ratio"] and report["peak_rss_anon_extra_bytes"] > 0
    assert report["peak_budget_bytes"] == int(1.5 * report["largest_tensor_bytes"] + 0.5e9)
    assert list(tmp_path.iterdir()) == []  # the generated checkpoint is removed without --keep
    assert report["read_seconds"]["n"] == report["stream_seconds"]["n"] == 2
    ratios = report["paired_throughput_ratios"]
    assert ratios["min"] <= ratios["median"] <= ratios["max"]
    assert {"load_before", "load_after", "idle", "pinned"} <= set(report)
