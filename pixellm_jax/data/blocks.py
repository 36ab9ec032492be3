"""The block layout of a batch: `groups` aligned blocks, each holding its images and their conversations.

Block g of a batch of `rows` images and `n` conversation slots holds images [g·rows/G, (g+1)·rows/G)
and slots [g·n/G, (g+1)·n/G), and a slot only points at an image of its own block, so the
per-conversation image gather (`models.grouped_take.take_in_groups`) stays on the device. The
training pipeline and the evaluation batches both pack to this layout.
"""

from __future__ import annotations

import numpy as np


def block_first_rows(groups: int, rows: int, n: int) -> np.ndarray:
    """[n] int32 host index: for n slots in `groups` blocks, the first of their block's `rows` / `groups`
    rows (where padding slots point, so they stay in their block)."""
    return np.repeat(np.arange(groups, dtype=np.int32) * (rows // groups), n // groups)
