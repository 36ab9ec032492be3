"""Reading dataset files defensively: paths inside a root, images, JSON, pickles, COCO masks.

Every data source goes through these helpers so that bad input fails the same way everywhere:
a problem with one record raises `BadSample(sample_id, reason)` (the pipeline skips and counts it,
or stops, by config); a problem with a whole file (unreadable, malformed, empty) raises
`DatasetFileError` naming the file, when the source is built.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import posixpath
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

from pixellm_jax.data.sample import IMAGE_PLACEHOLDER, BadSample, Conversation, Sample
from pixellm_jax.errors import UserError

# Polygon vertices may lie this many pixels outside the image (rounding in published annotations).
POLYGON_TOLERANCE = 1.0


class DatasetFileError(UserError, ValueError):
    """A dataset file (annotation JSON, pickle, directory) that cannot be used as a whole; the CLI
    reports it in one line."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def resolve_in_root(root: str | Path, relative: Any, sample_id: str) -> Path:
    """`root / relative` for a relative path taken from an annotation; refuses paths that escape root.

    Absolute paths and ".." components that climb out are refused, and so is a path that leaves root
    once symlinks are resolved (a link inside the dataset pointing elsewhere); root itself is resolved
    too, so a dataset directory may be a symlink set up by the operator. The path is returned unresolved.
    """
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise BadSample(sample_id, f"invalid file name {relative!r}")
    norm = posixpath.normpath(relative.replace("\\", "/"))
    if posixpath.isabs(norm) or norm == ".." or norm.startswith("../"):
        raise BadSample(sample_id, f"path {relative!r} escapes the dataset root {root}")
    path = Path(root) / norm
    target = path.resolve()
    if not target.is_relative_to(Path(root).resolve()):
        raise BadSample(sample_id, f"path {relative!r} escapes the dataset root {root} through a symlink (to {target})")
    return path


def image_to_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL image as [H, W, 3] uint8 RGB, with high-bit-depth greyscale scaled into 0-255.

    PIL's `convert("RGB")` clips "I;16" / "I" / "F" pixels at 255, which turns a 16-bit image white.
    Here 16-bit data (and "I" data within 0..65535) is scaled by 255/65535, other "I" data by
    255/(2^31 - 1); "F" data by 255 when it lies within [0, 1], else clipped to [0, 255]; negative
    values become 0. Every other mode goes through PIL: palettes applied, CMYK converted, 1-bit to
    0/255, alpha dropped (as cv2.imread, which the official loader uses, drops it).
    """
    if image.mode.startswith("I"):
        data = np.asarray(image).astype(np.float32)
        top = 65535 if data.max(initial=0) <= 65535 else 2**31 - 1
        grey = np.clip(data, 0, None) * np.float32(255 / top)
    elif image.mode == "F":
        data = np.nan_to_num(np.asarray(image, np.float32))
        grey = np.clip(data, 0, 1) * 255 if data.max(initial=0) <= 1 else np.clip(data, 0, 255)
    else:
        return np.array(image.convert("RGB"), dtype=np.uint8)
    return np.repeat(np.rint(grey).astype(np.uint8)[..., None], 3, axis=2)


def load_image(path: str | Path, sample_id: str) -> np.ndarray:
    """An image file as [H, W, 3] uint8 RGB; a missing or undecodable file raises BadSample."""
    try:
        with Image.open(path) as img:
            img.load()
            return image_to_rgb(img)
    except FileNotFoundError:
        raise BadSample(sample_id, f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadSample(sample_id, f"cannot decode image {path}: {e}") from None


def load_label_map(path: str | Path, sample_id: str) -> np.ndarray:
    """A single-channel label PNG (class index per pixel) as [H, W] int64."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("L", "P", "I", "I;16"):
                raise BadSample(sample_id, f"label map {path} has mode {img.mode}, expected one channel")
            return np.array(img, dtype=np.int64)
    except FileNotFoundError:
        raise BadSample(sample_id, f"label file not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadSample(sample_id, f"cannot decode label map {path}: {e}") from None


def read_json(path: str | Path) -> Any:
    """A JSON file's content; missing or malformed files raise DatasetFileError naming the file."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DatasetFileError(path, "file not found") from None
    except json.JSONDecodeError as e:
        raise DatasetFileError(path, f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (UnicodeDecodeError, OSError) as e:
        raise DatasetFileError(path, f"cannot read JSON: {e}") from None


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles plain data only: any global other than a few builtin containers is refused, so a
    crafted pickle cannot call functions (the REFER `refs(*).p` files are lists of plain dicts)."""

    _ALLOWED = {("builtins", "set"), ("builtins", "frozenset"), ("__builtin__", "set"), ("__builtin__", "frozenset")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return {"set": set, "frozenset": frozenset}[name]
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a data file")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed in a data file")


def read_plain_pickle(path: str | Path) -> Any:
    """A pickle of plain data (dicts, lists, strings, numbers); anything else raises DatasetFileError."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DatasetFileError(path, "file not found") from None
    except OSError as e:
        raise DatasetFileError(path, f"cannot read: {e}") from None
    try:
        return _PlainDataUnpickler(io.BytesIO(data), encoding="utf-8").load()
    except Exception as e:  # any failure of an untrusted pickle is the file's fault
        raise DatasetFileError(path, f"refused or malformed pickle: {e}") from None


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_polygon(poly: Any, height: int, width: int, sample_id: str) -> None:
    if not isinstance(poly, (list, tuple)) or len(poly) < 6 or len(poly) % 2 or not all(map(_is_number, poly)):
        raise BadSample(sample_id, "malformed polygon: expected an even list of at least 6 finite numbers")
    xs, ys = np.asarray(poly[0::2], np.float64), np.asarray(poly[1::2], np.float64)
    t = POLYGON_TOLERANCE
    if xs.min() < -t or ys.min() < -t or xs.max() > width + t or ys.max() > height + t:
        raise BadSample(
            sample_id,
            f"polygon outside the {height}x{width} image: x in [{xs.min()}, {xs.max()}], y in [{ys.min()}, {ys.max()}]",
        )


def _compressed_rle_counts(counts: str) -> list[int]:
    """The run lengths of a COCO compressed-RLE string (pycocotools' LEB128-like encoding).

    Parsed here so that a malformed string is refused before pycocotools decodes it without checks.
    """
    out: list[int] = []
    p = 0
    while p < len(counts):
        x, k, more = 0, 0, True
        while more:
            if p >= len(counts):
                raise ValueError("truncated counts string")
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"invalid character {counts[p]!r} in counts string")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def _rle(seg: dict, height: int, width: int, sample_id: str) -> dict:
    size, counts = seg.get("size"), seg.get("counts")
    if not isinstance(size, (list, tuple)) or list(size) != [height, width]:
        raise BadSample(sample_id, f"RLE size {size!r} differs from the image size {[height, width]}")
    if isinstance(counts, list):
        runs = counts
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in runs):
            raise BadSample(sample_id, "malformed RLE: counts must be integers")
    elif isinstance(counts, (str, bytes)):
        text = counts.decode("ascii", "replace") if isinstance(counts, bytes) else counts
        try:
            runs = _compressed_rle_counts(text)
        except ValueError as e:
            raise BadSample(sample_id, f"malformed RLE: {e}") from None
        counts = text.encode("ascii")
    else:
        raise BadSample(sample_id, f"malformed RLE: counts of type {type(counts).__name__}")
    if any(c < 0 for c in runs) or sum(runs) != height * width:
        raise BadSample(sample_id, f"malformed RLE: runs must be >= 0 and sum to {height * width}")
    if isinstance(counts, list):
        return mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    return {"size": [height, width], "counts": counts}


def decode_segmentation(segmentation: Any, height: int, width: int, sample_id: str) -> np.ndarray:
    """A COCO `segmentation` (polygons, one RLE dict, or a list of RLE dicts) as an [H, W] bool mask.

    Several polygons or RLEs are united. An empty list or an all-zero RLE gives an empty mask (an
    explicit "no target", as officially; prepared datasets store that as an all-zero RLE). Malformed
    or out-of-bounds input raises BadSample, and so do polygons that cover no pixel (collinear, one
    point, between pixel centres): they would silently become a target that is nowhere.
    """
    if isinstance(segmentation, dict):
        segmentation = [segmentation]
    if not isinstance(segmentation, list):
        raise BadSample(sample_id, f"malformed segmentation of type {type(segmentation).__name__}")
    mask = np.zeros((height, width), dtype=bool)
    if not segmentation:
        return mask
    polygons = not all(isinstance(s, dict) for s in segmentation)
    if polygons:
        for poly in segmentation:
            _check_polygon(poly, height, width, sample_id)
        rles = mask_utils.frPyObjects([[float(v) for v in p] for p in segmentation], height, width)
    else:
        rles = [_rle(s, height, width, sample_id) for s in segmentation]
    for rle in rles:
        mask |= mask_utils.decode(rle).astype(bool)
    if polygons and not mask.any():
        raise BadSample(sample_id, "degenerate polygon: zero area, a mask of zero pixels")
    return mask


def image_size_of(info: dict, sample_id: str) -> tuple[int, int]:
    """(height, width) declared by an annotation record, checked to be positive integers."""
    h, w = info.get("height"), info.get("width")
    if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
        raise BadSample(sample_id, f"invalid image size height={h!r} width={w!r}")
    return h, w


def check_image_size(image: np.ndarray, height: int, width: int, sample_id: str, path: str | Path) -> None:
    """Refuses an image whose size differs from the size its annotation declares."""
    if image.shape[:2] != (height, width):
        raise BadSample(sample_id, f"image {path} is {image.shape[0]}x{image.shape[1]}, annotation says {height}x{width}")


def build_sample(
    sample_id: str,
    dataset: str,
    image: np.ndarray,
    conversations: Sequence[tuple[list[tuple[str, str]], np.ndarray]],
) -> Sample:
    """A Sample from (turns, masks) pairs; inconsistent text or masks raise BadSample.

    Checks what annotation text could break: one "<image>" per conversation, at the start of its
    first question, and one mask per [SEG] placeholder.
    """
    if not conversations:
        raise BadSample(sample_id, "no usable conversation")
    convs = []
    for turns, masks in conversations:
        n_images = sum(q.count(IMAGE_PLACEHOLDER) + a.count(IMAGE_PLACEHOLDER) for q, a in turns)
        if n_images != 1 or not turns[0][0].startswith(IMAGE_PLACEHOLDER):
            raise BadSample(sample_id, f"conversation must hold one {IMAGE_PLACEHOLDER} at the start, found {n_images}")
        try:
            convs.append(Conversation(turns=list(turns), masks=np.asarray(masks, dtype=bool)))
        except ValueError as e:
            raise BadSample(sample_id, str(e)) from None
    try:
        return Sample(sample_id=sample_id, dataset=dataset, image=image, conversations=convs)
    except ValueError as e:
        raise BadSample(sample_id, str(e)) from None


def stack_masks(masks: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    """[k, H, W] bool from k masks (k may be 0)."""
    if not masks:
        return np.zeros((0, height, width), dtype=bool)
    return np.stack(masks).astype(bool)
