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
    assert report["bound"]["total_s"] > 0 and 0 < report["against_bound"]["ours_of_bound"]
    assert report["torch_device"] == "cpu" and report["jax_device"]


def test_generate_benchmark_takes_the_torch_device():
    report = bench.main([*SMALL, "--repeats", "1", "--recompute-repeats", "0", "--torch-device", "cpu",
                         "--no-roofline"])
    assert report["tokens_equal"]["transformers"] == 1.0 and report["torch_device"] == "cpu"
    assert report["bound"] is None and report["machine"] is None


def test_profile_attributes_the_decode_step():
    report = profile.main([*SMALL, "--repeats", "2"])
    parts = report["per_step_us"]
    assert report["unstacked_decode"] and report["decode_step_us"] > 0
    assert {"lm_head", "KV-cache update", "attention", "layer matmuls (q/k/v/o, MLP)", "sampling"} <= set(parts)
    assert parts.get("slicing stacked weights / caches", 0) == 0  # sliced once, before the loop
    assert report["python_loop_step_us"] > 0 and report["lm_head_alone_us"] > 0


def test_roofline_bound_counts_weights_cache_and_flops():
    from types import SimpleNamespace

    roofline = load_tool("roofline")
    text = SimpleNamespace(hidden_size=8, intermediate_size=16, num_heads=2, num_kv_heads=1, num_layers=3,
                           vocab_size=10)
    shapes = roofline.llm_shapes(text)
    # q 8x8, k and v 8x4 each, o 8x8, MLP 3 x 8x16, two norms of 8
    assert shapes["layer_params"] == 64 + 32 + 32 + 64 + 384 + 16 and shapes["kv_per_token"] == 2 * 3 * 4
    machine = {"best_read_gb_s": 1e-6, "best_matmul_gflop_s": 1.0}  # 1 kB/s and 1 GFLOP/s
    bound = roofline.generation_bound(text, batch=2, prompt_tokens=5, new_tokens=3, machine=machine)
    weights = 3 * 592 + 80
    assert bound["prefill_s"] == round(2 * weights * 2 * 5 / 1e9, 4)
    # two cached steps, over 5 and 6 cached positions, bound by memory at this bandwidth
    expect = sum((weights + 2 * cached * 24) * 4 / 1e3 for cached in (5, 6))
    assert abs(bound["decode_s"] - expect) < 1e-3
    assert roofline.against(bound, ours_s=2 * bound["total_s"], other_s=6 * bound["total_s"]) == {
        "ours_of_bound": 0.5, "max_speedup_vs_other": 6.0}
    measured = roofline.measure_machine(repeats=1, stream_bytes=1 << 20, matmul_size=64)
    assert measured["best_read_gb_s"] == max(measured["read_gb_s"].values()) > 0
    assert set(measured["matmul_gflop_s"]) == {"xla", "torch", "numpy"}
