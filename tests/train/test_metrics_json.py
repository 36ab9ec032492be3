"""metrics.jsonl stays strict JSON: NaN/Inf scalars are written as null and listed under "nonfinite"."""

import json
import math

import pytest

from pixellm_jax.train.metrics import MetricsWriter


def _strict(line: str) -> dict:
    return json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c} in {line}"))


def test_nonfinite_values_are_null_and_flagged(tmp_path, monkeypatch):
    writer = MetricsWriter(tmp_path)
    scalars = {}
    monkeypatch.setattr(writer._tb, "add_scalar", lambda tag, value, step: scalars.setdefault(tag, value))
    writer.write(1, {"total": float("nan"), "grad_norm": float("inf"), "ce": -math.inf, "lr": 1e-4})
    writer.write(2, {"total": 0.5, "lr": 2e-4}, kind="eval")
    writer.close()
    first, second = (_strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines())
    assert (first["kind"], first["step"]) == ("train", 1)
    assert first["total"] is None and first["grad_norm"] is None and first["ce"] is None
    assert first["lr"] == 1e-4 and first["nonfinite"] == ["total", "grad_norm", "ce"]
    assert (second["kind"], second["total"], second["lr"]) == ("eval", 0.5, 2e-4) and "nonfinite" not in second
    assert math.isnan(scalars["train/total"]) and scalars["train/grad_norm"] == math.inf  # TensorBoard: the floats
