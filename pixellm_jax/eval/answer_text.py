"""Answer text with its targets numbered: "Sure, the red circle is [1] and the square is [2]."

Generated ids are cut at the end-of-sequence token; every complete group of N·L codebook tokens (by
order of occurrence, as the masks are grouped) becomes the marker "[k]" of the k-th mask, and the text
between groups is decoded by the tokenizer. When the codebook-token count is not a multiple of N·L
the answer has no masks (official rule), so it is decoded as it is, codebook tokens included.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

from pixellm_jax.data.sample import SEG_PLACEHOLDER

_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:!?])")


def _tidy(pieces: list[str]) -> str:
    text = " ".join(p.strip() for p in pieces if p.strip())
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text)


def raw_answer(decode: Callable[[list[int]], str], tokens: Sequence[int], eos_id: int) -> str:
    """The generated ids up to end-of-sequence, decoded as they are (codebook tokens included): the text
    a later turn's history feeds back, which `LegacyTokenizer` turns into the same codebook ids."""
    ids = [int(t) for t in tokens]
    return decode(ids[: ids.index(eos_id)] if eos_id in ids else ids)


def numbered_answer(
    decode: Callable[[list[int]], str], tokens: Sequence[int], seg_ids: Sequence[int], group: int, eos_id: int
) -> tuple[str, int]:
    """(answer text with "[k]" markers, number of targets) for generated token ids."""
    ids = [int(t) for t in tokens]
    if eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    seg = {int(s) for s in seg_ids}
    count = sum(t in seg for t in ids)
    if count % group:
        return _tidy([decode(ids)]), 0
    pieces, run, seen = [], [], 0
    for t in ids:
        if t not in seg:
            run.append(t)
            continue
        if run:
            pieces.append(decode(run))
            run = []
        seen += 1
        if seen % group == 0:
            pieces.append(f"[{seen // group}]")
    if run:
        pieces.append(decode(run))
    return _tidy(pieces), count // group


def number_placeholders(answer: str) -> str:
    """A reference answer with its k-th target placeholder written "[k]"."""
    parts = answer.split(SEG_PLACEHOLDER)
    return "".join(p + (f"[{i + 1}]" if i < len(parts) - 1 else "") for i, p in enumerate(parts))
