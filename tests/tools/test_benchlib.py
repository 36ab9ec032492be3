"""The shared benchmark helpers: round-robin order, medians and spread, paired ratios, load records."""

import pytest

from tests.tools._load import load_tool

benchlib = load_tool("benchlib")


def test_interleave_runs_the_systems_round_robin_after_a_warm_up():
    calls = []
    run = benchlib.interleave({"a": lambda: calls.append("a") or "A", "b": lambda: calls.append("b") or "B",
                               "slow": lambda: calls.append("s") or "S"}, {"a": 3, "b": 3, "slow": 1})
    assert calls == ["a", "b", "s"] + ["a", "b", "s"] + ["a", "b"] * 2  # warm-ups, then rounds
    assert [len(run.times[k]) for k in ("a", "b", "slow")] == [3, 3, 1]
    assert set(run.first_call) == {"a", "b", "slow"} and run.results == {"a": "A", "b": "B", "slow": "S"}


def test_a_system_with_no_repeats_is_not_run():
    calls = []
    run = benchlib.interleave({"a": lambda: calls.append("a"), "off": lambda: calls.append("off")},
                              {"a": 2, "off": 0}, warmup_fns={"a": lambda: calls.append("warm")})
    assert calls == ["warm", "a", "a"] and run.times["off"] == [] and "off" not in run.first_call


def test_summary_and_ratios():
    st = benchlib.summary([3.0, 1.0, 2.0, 10.0, 4.0])
    assert (st["n"], st["median"], st["min"], st["max"], st["q1"], st["q3"]) == (5, 3.0, 1.0, 10.0, 2.0, 4.0)
    r = benchlib.ratio([4.0, 6.0, 8.0], [2.0, 2.0, 4.0])  # slow / fast
    assert r["median_ratio"] == 3.0 and (r["paired_min"], r["paired_median"], r["paired_max"]) == (2.0, 2.0, 3.0)


def test_load_record_warns_when_busy(monkeypatch, capsys):
    monkeypatch.setattr(benchlib, "load_average", lambda: 3.0)
    busy = benchlib.LoadRecord()
    busy.warn()
    assert "WARNING: load average 3.00" in capsys.readouterr().err
    assert busy.finish().as_dict() == {"load_before": 3.0, "load_after": 3.0, "idle": False, "idle_threshold": 1.5}
    monkeypatch.setattr(benchlib, "load_average", lambda: 0.4)
    idle = benchlib.LoadRecord()
    idle.warn()
    assert capsys.readouterr().err == "" and idle.idle


def test_pin_threads_keeps_the_allowed_cpus_by_default():
    import os

    allowed = sorted(os.sched_getaffinity(0))
    record = benchlib.pin_threads()
    assert record["cpus"] == allowed and record["threads"] == len(allowed)
    with pytest.raises(ValueError, match="may use"):
        benchlib.pin_threads(len(allowed) + 1)
    assert sorted(os.sched_getaffinity(0)) == allowed
