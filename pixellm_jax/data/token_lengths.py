"""How long a run's conversations are, against its token buckets and context length.

A run surveys a spread of its training records once at start-up: the token-length percentiles of
their conversations (text tokens, as the pipeline counts them against `data.token_buckets`), the
share longer than the largest bucket, and buckets that would fit them — so a user sees before the
first step that, say, MUSE answers do not fit the demo's buckets.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pixellm_jax.data.conversation import LegacyTokenizer, tokenize_training
from pixellm_jax.data.sample import BadSample, Source

PERCENTILES = (50, 90, 99)


def conversation_lengths(sources: Sequence[Source], tok: LegacyTokenizer, use_im_start_end: bool,
                         count: int = 200, seed: int = 0) -> np.ndarray:
    """Untruncated text-token lengths of the conversations of about `count` records spread over `sources`."""
    rng = np.random.default_rng(seed)
    lengths = []
    per_source = max(1, count // len(sources))
    for source in sources:
        for index in np.linspace(0, len(source) - 1, min(per_source, len(source))).astype(int):
            try:
                sample = source.get(int(index), rng)
            except (BadSample, ValueError):
                continue
            for c in sample.conversations:
                t = tokenize_training(tok, c.turns, 1 << 30, use_im_start_end)
                lengths.append(len(t.input_ids))
    return np.asarray(lengths, np.int64)


def suggest_buckets(lengths: np.ndarray, max_text_len: int, count: int = 3) -> list[int]:
    """Up to `count` increasing buckets (multiples of 8) at evenly spaced quantiles up to the longest
    length, none beyond what `data.model_max_length` leaves for text."""
    if lengths.size == 0:
        return []
    qs = np.quantile(lengths, np.linspace(1 / count, 1, count))
    buckets = sorted({min(int(-(-q // 8) * 8), max_text_len) for q in qs})
    return buckets


def length_report(lengths: np.ndarray, token_buckets: Sequence[int], max_text_len: int) -> dict:
    """Percentiles, the share over the largest bucket / the context, and suggested buckets."""
    if lengths.size == 0:
        return {"conversations": 0}
    report = {"conversations": int(lengths.size)}
    report.update({f"p{p}": float(np.percentile(lengths, p)) for p in PERCENTILES})
    report["max"] = int(lengths.max())
    report["over_largest_bucket"] = float(np.mean(lengths > token_buckets[-1]))
    report["over_model_max_length"] = float(np.mean(lengths > max_text_len))
    report["token_buckets"] = list(token_buckets)
    report["suggested_buckets"] = suggest_buckets(lengths, max_text_len)
    return report


def describe(report: dict) -> str:
    """One line for the run's log."""
    if not report.get("conversations"):
        return "conversation lengths: no record could be read"
    line = (f"conversation lengths ({report['conversations']} surveyed): median {report['p50']:.0f}, "
            f"p90 {report['p90']:.0f}, p99 {report['p99']:.0f}, max {report['max']} tokens; "
            f"{report['over_largest_bucket']:.0%} exceed the largest of data.token_buckets {report['token_buckets']}")
    if report["over_largest_bucket"] > 0.01:
        line += f" (they are dropped; buckets that fit: {report['suggested_buckets']})"
    return line
