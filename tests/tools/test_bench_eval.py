"""Smoke test of the evaluation benchmark: both loops score the same MUSE split with the same answers."""

import json

from tests.tools._load import load_tool

bench = load_tool("bench_eval")


def test_batched_eval_and_the_official_loop_agree(capsys):
    report = bench.main(["--size", "tiny", "--records", "2", "--repeats", "1", "--max-new-tokens", "12",
                         "--answer-words", "2", "--rows", "4", "--images", "4"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(report))
    assert report["questions"] == 4  # two images, two questions each
    assert report["answers_identical"] == 4 and report["metrics_identical"]
    assert report["answer_tokens"] == {"min": 11, "max": 11}  # 2 words, [SEG] (6 tokens), ".", </s>
    assert report["metrics"]["matched"] == 4 and report["metrics"]["malformed_answers"] == 0
    for system in report["systems"].values():
        assert system["seconds"]["n"] == 1 and system["questions_per_s"] > 0
    assert report["vs_official"]["pairs"] == 1 and report["speedup"] > 0
    assert {"load_before", "load_after", "idle", "pinned"} <= set(report)
