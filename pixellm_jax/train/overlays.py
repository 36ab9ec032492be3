"""The mask overlays a training run writes after its last evaluation, and the page that shows them.

Each PNG is the image, then the same image with every predicted target tinted and numbered in its
palette colour and each ground truth outlined in the colour of the prediction it is scored against.
`index.json` lists each file with its text and per-target IoU; `index.html` shows them together.

* teacher-forced splits (`write_overlays`): the model read the reference answer, so target k of the
  answer is compared with ground truth k;
* generated answers (`write_answer_overlays`, MUSE protocol): the question, the generated answer with
  its numbered targets and the reference answer; predictions are paired with ground truths by the
  evaluation's Hungarian matching, and a ground truth no prediction matched is outlined in a colour of
  its own and listed as missed.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from pixellm_jax.data.transforms import CLIP_MEAN, CLIP_STD, OFFICIAL_MEAN, OFFICIAL_STD
from pixellm_jax.eval.metrics import exact_iou, intersection_union
from pixellm_jax.overlay import PALETTE, outlined, overlay


@dataclass
class AnswerOverlay:
    """One generated answer of a held-out question, with what it was scored against."""

    image: np.ndarray  # [H, W, 3] uint8, original resolution
    preds: np.ndarray  # [P, H, W] bool, in the answer's target order
    gt: np.ndarray  # [G, H, W] bool
    question: str
    answer: str  # generated, targets numbered "[k]"
    reference: str  # the reference answer, targets numbered
    pairs: list[dict]  # the evaluation record's pairs: pred / gt index (None when unmatched), iou


def write_overlays(directory: Path, kept: list[tuple[dict, np.ndarray]], hf_tokenizer, count: int,
                   normalization: str, scale: int = 4) -> list[Path]:
    """Overlays of teacher-forced held-out conversations: (training-shaped batch, predicted masks) pairs."""
    entries = []
    for local, pred in kept:
        for j in np.flatnonzero(local["conv_valid"]):
            if len(entries) == count:
                break
            row = int(local["conv_image"][j])
            hw = local["resized_hw"][row]
            image = _image(local["pixels"][row], hw, normalization)
            mh, mw = (int(v) for v in local["mask_hw"][row])
            targets = np.flatnonzero(local["mask_valid"][j])
            preds = [_resize_mask(pred[j, t, :mh, :mw], hw) for t in targets]
            truths = [_resize_mask(local["masks"][j, t, :mh, :mw], hw) for t in targets]
            ious = [exact_iou(*intersection_union(p, g)) for p, g in zip(preds, truths)]
            ids = [int(i) for i in local["input_ids"][j][local["attention_mask"][j]] if i >= 0]
            picture = _picture(image, preds, truths, None, scale)
            entries.append((picture, {"text": hf_tokenizer.decode(ids), "iou": ious,
                                      "targets": [(f"target {k + 1}", k, iou) for k, iou in enumerate(ious)]}))
    return _write(directory, entries)


def write_answer_overlays(directory: Path, kept: Sequence[AnswerOverlay], count: int, scale: int = 4) -> list[Path]:
    """Overlays of generated answers (MUSE protocol), predictions coloured in answer order."""
    entries = []
    for item in list(kept)[:count]:
        num_pred = len(item.preds)
        matched = {p["gt"]: p["pred"] for p in item.pairs if p["pred"] is not None and p["gt"] is not None}
        missed = [g for g in range(len(item.gt)) if g not in matched]
        colours = [matched[g] if g in matched else num_pred + missed.index(g) for g in range(len(item.gt))]
        by_pred = {p["pred"]: p["iou"] for p in item.pairs if p["pred"] is not None}
        targets = [(f"target {k + 1}", k, by_pred.get(k, 0.0)) for k in range(num_pred)]
        targets += [(f"missed ground truth {i + 1}", num_pred + i, 0.0) for i in range(len(missed))]
        text = f"Q: {item.question}\nA: {item.answer}\nReference: {item.reference}"
        picture = _picture(item.image, list(item.preds), list(item.gt), colours, scale)
        entries.append((picture, {"text": text, "iou": [t[2] for t in targets], "targets": targets}))
    return _write(directory, entries)


def overlay_page(index: list[dict]) -> str:
    """An HTML page of the overlays: each image with its text and one swatch and IoU per target."""
    items = []
    for entry in index:
        legend = "".join(
            f'<li><span style="background:rgb{PALETTE[colour % len(PALETTE)]}">&nbsp;&nbsp;&nbsp;</span> '
            f"{html.escape(label)}: IoU {iou:.3f}</li>" for label, colour, iou in entry["targets"])
        items.append(f'<figure><img src="{html.escape(entry["file"])}"><figcaption><pre>'
                     f'{html.escape(entry["text"])}</pre><ul>{legend}</ul></figcaption></figure>')
    return ("<!doctype html><meta charset=utf-8><title>overlays</title><style>figure{display:inline-block;"
            "vertical-align:top;max-width:44em;margin:1em}pre{white-space:pre-wrap}ul{list-style:none;padding:0}"
            "</style><p>Left: the image. Right: each predicted mask tinted and numbered, its ground truth "
            "outlined in the same colour.</p>" + "".join(items) + "\n")


def _write(directory: Path, entries: list[tuple[Image.Image, dict]]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written, index = [], []
    for picture, entry in entries:
        path = directory / f"overlay_{len(written):02d}.png"
        picture.save(path)
        index.append({"file": path.name, **entry})
        written.append(path)
    (directory / "index.json").write_text(json.dumps(index, indent=2))
    (directory / "index.html").write_text(overlay_page(index))
    return written


def _picture(image: np.ndarray, preds: list[np.ndarray], truths: list[np.ndarray], colours: Sequence[int] | None,
             scale: int) -> Image.Image:
    """The image beside its tinted, numbered predictions with the ground truths outlined (ground truth k
    in colour k, or `colours[k]`)."""
    h, w = image.shape[:2]
    big = _upscale(scale, image)
    tinted = overlay(big, np.asarray([_upscale(scale, p) for p in preds], bool).reshape(len(preds), h * scale, w * scale))
    tinted = outlined(tinted, np.asarray([_upscale(scale, g) for g in truths], bool).reshape(len(truths), h * scale, w * scale),
                      colours)
    gap = np.full((h * scale, 2 * scale, 3), 255, np.uint8)
    return Image.fromarray(np.concatenate([big, gap, np.asarray(tinted)], 1))


def _image(pixels: np.ndarray, hw: np.ndarray, normalization: str) -> np.ndarray:
    """The uint8 RGB image a normalised, padded [S, S, 3] array came from (cropped to hw)."""
    if normalization == "official":
        rgb = pixels * np.float32(OFFICIAL_STD) + np.float32(OFFICIAL_MEAN)
    else:
        rgb = (pixels * np.float32(CLIP_STD) + np.float32(CLIP_MEAN)) * 255.0
    return np.clip(np.rint(rgb[: hw[0], : hw[1]]), 0, 255).astype(np.uint8)


def _upscale(scale: int, a: np.ndarray) -> np.ndarray:
    """Pixel replication, so the numbers and outlines drawn on a small image have room to be read."""
    return a.repeat(scale, 0).repeat(scale, 1)


def _resize_mask(mask: np.ndarray, hw) -> np.ndarray:
    h, w = int(hw[0]), int(hw[1])
    if mask.shape == (h, w):
        return mask.astype(bool)
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127
