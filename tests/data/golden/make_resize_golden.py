"""Regenerate resize_golden.npz: Pillow 9.4.0 bilinear resizes, the reference for tests/data/test_resize.py.

Run it with Pillow 9.4.0, the version the official PixelLM pins, in a scratch venv outside the repo:

    python3 -m venv /tmp/pil94 && /tmp/pil94/bin/pip install pillow==9.4.0 numpy
    /tmp/pil94/bin/python tests/data/golden/make_resize_golden.py

It refuses any other Pillow. It needs only NumPy and Pillow; the test imports `CASES` and
`make_input` from this file, so the inputs are made by the same code here and there. They are
built from integer arithmetic, not a NumPy random generator, so they do not change between NumPy
versions.

For each case (H, W) -> (h, w) and each input kind ("noise": uniform over 0..255, the hardest on
rounding; "smooth": gradients with 16-pixel checks, like photographs with edges) the file holds
  * `<key>/sha256`: the SHA-256 of Pillow's output bytes (C order), which the test checks exactly;
  * `<key>/full`: the whole output, for outputs of up to FULL_MAX values and for the first case's
    smooth input;
  * `<key>/sample`: every SAMPLE_STRIDE-th row and column, which says where a mismatch lies
    when only the digest is stored.
Whole outputs for every noise case would take megabytes; with the digests the file stays small.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).with_name("resize_golden.npz")
FULL_MAX = 20_000
SAMPLE_STRIDE = 16
KINDS = ("noise", "smooth")

# (H, W) -> (h, w). All but the last two are what `longest_side_shape(hw, 448)` gives.
CASES: tuple[tuple[tuple[int, int], tuple[int, int]], ...] = (
    ((560, 250), (448, 200)),  # tall downscale: Pillow >= 13 runs the vertical pass first here
    ((250, 560), (200, 448)),
    ((1000, 700), (448, 314)),
    ((700, 1000), (314, 448)),
    ((449, 300), (448, 299)),
    ((300, 449), (299, 448)),
    ((1080, 1920), (252, 448)),
    ((1200, 451), (448, 168)),  # tall, odd sizes (168.37 -> 168)
    ((451, 97), (448, 96)),  # odd sizes, tiny downscale
    ((123, 457), (121, 448)),
    ((30, 45), (299, 448)),  # upscales
    ((37, 20), (448, 242)),
    ((101, 448), (101, 448)),  # longest side already 448: not resized
    ((448, 448), (448, 448)),
    ((1, 1000), (1, 448)),  # one pixel thin (only the long side is resampled)
    ((1000, 1), (448, 1)),
    ((3, 900), (1, 448)),  # three rows onto one, both passes
    ((900, 3), (448, 1)),
    ((1, 40), (11, 448)),  # thin upscale
    ((1, 1), (448, 448)),
    ((1172, 161), (268, 282)),  # arbitrary sizes: shrink one side, enlarge the other
    ((64, 500), (200, 77)),
)


def _hash_bytes(h: int, w: int, seed: int) -> np.ndarray:
    """[h, w, 3] uint8 pseudo-random bytes from a 32-bit integer hash of (row, column, channel, seed)."""
    m = np.uint64(0xFFFFFFFF)
    i = np.arange(h, dtype=np.uint64)[:, None, None]
    j = np.arange(w, dtype=np.uint64)[None, :, None]
    c = np.arange(3, dtype=np.uint64)[None, None, :]
    x = i * np.uint64(0x9E3779B1) + j * np.uint64(0x85EBCA77) + c * np.uint64(0xC2B2AE3D)
    x = (x + np.uint64(seed * 0x27D4EB2F)) & m
    for shift, mul in ((15, 0x2C1B3C6D), (12, 0x297A2D39), (15, 0x1B873593)):
        x ^= x >> np.uint64(shift)
        x = (x * np.uint64(mul)) & m
    x ^= x >> np.uint64(16)
    return (x >> np.uint64(24)).astype(np.uint8)


def make_input(hw: tuple[int, int], kind: str) -> np.ndarray:
    """The deterministic [H, W, 3] uint8 input of one case."""
    h, w = hw
    seed = h * 7919 + w
    if kind == "noise":
        return _hash_bytes(h, w, seed)
    if kind == "smooth":
        y, x = np.arange(h)[:, None], np.arange(w)[None, :]
        ramps = (x * 200 // max(w - 1, 1), y * 200 // max(h - 1, 1), (x + y) * 200 // max(h + w - 2, 1))
        base = np.stack(np.broadcast_arrays(*ramps), -1)
        checks = ((y // 16 + x // 16) % 2)[..., None] * 40
        return (base + checks).astype(np.uint8)
    raise ValueError(kind)


def key(hw: tuple[int, int], out_hw: tuple[int, int], kind: str) -> str:
    return f"{hw[0]}x{hw[1]}_{out_hw[0]}x{out_hw[1]}_{kind}"


def digest(array: np.ndarray) -> np.ndarray:
    return np.frombuffer(hashlib.sha256(np.ascontiguousarray(array).tobytes()).digest(), np.uint8)


def main() -> None:
    import PIL
    from PIL import Image

    if PIL.__version__ != "9.4.0":
        sys.exit(f"needs Pillow 9.4.0 (the official PixelLM pin), found {PIL.__version__}")
    arrays = {"pillow_version": np.array(PIL.__version__)}
    for hw, out_hw in CASES:
        for kind in KINDS:
            out = np.asarray(Image.fromarray(make_input(hw, kind)).resize(out_hw[::-1], Image.BILINEAR))
            assert out.shape == (*out_hw, 3) and out.dtype == np.uint8
            k = key(hw, out_hw, kind)
            arrays[f"{k}/sha256"] = digest(out)
            arrays[f"{k}/sample"] = out[::SAMPLE_STRIDE, ::SAMPLE_STRIDE]
            if out.size <= FULL_MAX or (kind == "smooth" and hw == CASES[0][0]):
                arrays[f"{k}/full"] = out
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} KiB, {len(CASES)} cases x {len(KINDS)} inputs)")


if __name__ == "__main__":
    main()
