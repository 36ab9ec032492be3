"""Position tables for a larger patch grid, built from a pretrained CLIP table [1 + g*g, D].

Two constructions exist and give different tables (reference §1.2, WEIGHT_FORMATS §3):
- "hf": transformers' `interpolate_pos_encoding` — row 0 (CLS) kept, the g x g grid resized bicubically
  (torch semantics: Keys kernel A = -0.75, clamped indices, align_corners=False).
- "official": PixelLM's `clip_encoder.py` — the LAST row is taken as "CLS" and re-appended at the end, rows
  0..g*g-1 (the real CLS included) form the grid, resized bilinearly (align_corners=False). The released
  checkpoints were trained on this off-by-one table, so it is reproduced as is.

Pure numpy (float64 arithmetic, result in the table's dtype) so that conversion needs no torch, and
because `jax.image.resize` bicubic is not torch's bicubic.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

_CUBIC_A = -0.75


def _source_grid(table: np.ndarray) -> int:
    """Side g of the square grid of a table with 1 + g*g rows."""
    if table.ndim != 2:
        raise ValueError(f"position table must be [1 + g*g, D], got shape {table.shape}")
    g = int(round(np.sqrt(table.shape[0] - 1)))
    if g * g + 1 != table.shape[0]:
        raise ValueError(f"position table has {table.shape[0]} rows; expected 1 + g*g for a square grid")
    return g


def _source_coords(n_in: int, n_out: int) -> np.ndarray:
    """Source coordinate of each output pixel centre (align_corners=False, scale = in / out)."""
    return (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Keys cubic-convolution weights [n, 4] for taps at offsets -1, 0, 1, 2 from floor(x)."""
    a = _CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] matrix of torch's 1-D bicubic resize (align_corners=False, edge indices clamped)."""
    src = _source_coords(n_in, n_out)
    base = np.floor(src)
    weights = _cubic_weights(src - base)
    taps = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3)[None, :], 0, n_in - 1)
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.repeat(np.arange(n_out), 4), taps.ravel()), weights.ravel())
    return m


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] matrix of torch's 1-D bilinear resize (align_corners=False, no antialias)."""
    src = np.maximum(_source_coords(n_in, n_out), 0.0)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m


def _resize_grid(grid: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Separable resize of a row-major grid [g, g, D] with one 1-D matrix applied to both axes."""
    return np.einsum("oi,ijd,pj->opd", matrix, grid.astype(np.float64), matrix)


def interpolate_positions_hf(table: np.ndarray, new_grid: int) -> np.ndarray:
    """transformers' bicubic table [1 + new_grid**2, D]: CLS row first, then the resized grid."""
    table = np.asarray(table)
    g = _source_grid(table)
    d = table.shape[1]
    grid = table[1:].reshape(g, g, d)
    resized = _resize_grid(grid, bicubic_matrix(g, new_grid)).reshape(new_grid * new_grid, d)
    return np.concatenate([table[:1].astype(np.float64), resized]).astype(table.dtype)


def interpolate_positions_official(table: np.ndarray, new_grid: int) -> np.ndarray:
    """PixelLM's bilinear table [1 + new_grid**2, D], off-by-one included: grid = rows 0..g*g-1, last row
    re-appended at the end."""
    table = np.asarray(table)
    g = _source_grid(table)
    d = table.shape[1]
    grid = table[:-1].reshape(g, g, d)
    resized = _resize_grid(grid, bilinear_matrix(g, new_grid)).reshape(new_grid * new_grid, d)
    return np.concatenate([resized, table[-1:].astype(np.float64)]).astype(table.dtype)


def resize_position_table(
    table: np.ndarray, new_grid: int, method: Literal["official", "hf"]
) -> np.ndarray:
    """The table for `new_grid` by `method` (`VisionConfig.position_interpolation`)."""
    if method == "official":
        return interpolate_positions_official(table, new_grid)
    if method == "hf":
        return interpolate_positions_hf(table, new_grid)
    raise ValueError(f"position_interpolation {method!r} is not one of ['official', 'hf']")
