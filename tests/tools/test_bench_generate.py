"""Smoke test of the generation benchmark (shortened): the systems interleave and produce the same tokens."""

from tests.tools._load import load_tool

bench = load_tool("bench_generate")
profile = load_tool("profile_generate")
SMALL = ["--batch", "2", "--prompt-len", "8", "--new-tokens", "4", "--layers", "1", "--hidden", "64", "--vocab", "256"]


def test_generate_benchmark_compares_interleaved_medians():
    report = bench.main([*SMALL, "--repeats", "2", "--recompute-repeats", "1"])
    assert report["tokens_equal"] == {"transformers": 1.0, "ours_full": 1.0, "recompute": 1.0}
    systems = report["systems"]
    assert [systems[k]["seconds"]["n"] for k in (bench.OURS_LLM, bench.HF, bench.OURS_FULL, bench.RECOMPUTE)] == [
        2, 2, 2, 1]
    assert report["vs_transformers"]["pairs"] == 2 and report["vs_recompute"]["pairs"] == 1
    assert report["speedup_vs_transformers"] == report["vs_transformers"]["median_ratio"] > 0
    assert {"load_before", "load_after", "idle"} <= set(report) and report["pinned"]["torch_threads"] >= 1


def test_profile_attributes_the_decode_step():
    report = profile.main([*SMALL, "--repeats", "2"])
    parts = report["per_step_us"]
    assert report["unstacked_decode"] and report["decode_step_us"] > 0
    assert {"lm_head", "KV-cache update", "attention", "layer matmuls (q/k/v/o, MLP)", "sampling"} <= set(parts)
    assert parts.get("slicing stacked weights / caches", 0) == 0  # sliced once, before the loop
    assert report["python_loop_step_us"] > 0 and report["lm_head_alone_us"] > 0
