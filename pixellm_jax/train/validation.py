"""Held-out evaluation during training: teacher-forced gIoU / cIoU, validation loss, mask overlays.

Teacher-forced: the model reads the ground-truth answer (so the number of targets is given) and each
codebook group's mask is compared with its target on the mask canvas, at the image's canvas
resolution `mask_hw`. Per target IoU = |pred ∩ gt| / |pred ∪ gt| with pred = logit > 0 (1 when both
are empty); gIoU is the mean over targets, cIoU the ratio of the summed intersections and unions.
Generation-based benchmark evaluation lives in the evaluation package; this is the cheap signal a
training run tracks and picks its best checkpoint by.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from pixellm_jax.config import Config
from pixellm_jax.data.transforms import CLIP_MEAN, CLIP_STD, OFFICIAL_MEAN, OFFICIAL_STD
from pixellm_jax.objective import pixellm_objective
from pixellm_jax.overlay import PALETTE, outlined, overlay
from pixellm_jax.postprocess import target_masks
from pixellm_jax.train.mesh import global_batch
from pixellm_jax.train.state import StateLayout, TrainState


def make_eval_step(layout: StateLayout, cfg: Config, mesh: Mesh, batch_shardings: dict, image_groups: int = 1):
    """`eval_step(params, rngs, frozen, batch) -> (sums, predicted masks [Q, M, C, C] bool)`."""

    def step(params, rngs, frozen, batch):
        model = nnx.merge(layout.graphdef, params, rngs, frozen, copy=True)
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            loss, metrics, out = pixellm_objective(model, batch, cfg.loss, deterministic=True,
                                                   image_groups=image_groups)
        targets = batch["masks"]
        logits, pixel_valid = target_masks(out.mask_logits, batch["resized_hw"], batch["mask_hw"], batch["conv_image"],
                                           targets.shape[-2:], cfg.model.vision.image_size, image_groups)
        pred = (logits > 0) & pixel_valid
        gt = targets & pixel_valid
        inter = (pred & gt).sum((-2, -1)).astype(jnp.float32)
        union = (pred | gt).sum((-2, -1)).astype(jnp.float32)
        iou = jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 1.0)
        valid = out.seg.valid & batch["mask_valid"] & batch["conv_valid"][:, None]
        sums = {
            "iou": jnp.where(valid, iou, 0.0).sum(),
            "intersection": jnp.where(valid, inter, 0.0).sum(),
            "union": jnp.where(valid, union, 0.0).sum(),
            "targets": valid.sum().astype(jnp.float32),
            "loss": loss,
            "ce": metrics["ce"],
        }
        return sums, pred

    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = layout.state_shardings
    return jax.jit(
        step,
        in_shardings=(shardings.params, shardings.rngs, layout.frozen_shardings, batch_shardings),
        out_shardings=(replicated, batch_shardings["masks"]),
    )


def evaluate(eval_step, state: TrainState, frozen, batches: Iterable[dict], shardings: dict,
             keep_predictions: int = 0) -> tuple[dict[str, float], list[tuple[dict, np.ndarray]]]:
    """Metrics over host-local `batches`, and the first `keep_predictions` (batch, predicted masks).

    Returns giou, ciou, val_loss, val_ce and the number of targets.
    """
    totals: dict[str, float] = {}
    kept = []
    n = 0
    for local in batches:
        sums, pred = eval_step(state.params, state.rngs, frozen, global_batch(local, shardings))
        for k, v in jax.device_get(sums).items():
            totals[k] = totals.get(k, 0.0) + float(v)
        if len(kept) < keep_predictions and jax.process_count() == 1:
            kept.append((local, np.asarray(pred)))
        n += 1
    targets = max(totals.get("targets", 0.0), 1.0)
    metrics = {
        "giou": totals.get("iou", 0.0) / targets,
        "ciou": totals.get("intersection", 0.0) / max(totals.get("union", 0.0), 1.0),
        "val_loss": totals.get("loss", 0.0) / max(n, 1),
        "val_ce": totals.get("ce", 0.0) / max(n, 1),
        "targets": totals.get("targets", 0.0),
    }
    return metrics, kept


def _image(pixels: np.ndarray, hw: np.ndarray, normalization: str) -> np.ndarray:
    """The uint8 RGB image a normalised, padded [S, S, 3] array came from (cropped to hw)."""
    if normalization == "official":
        rgb = pixels * np.float32(OFFICIAL_STD) + np.float32(OFFICIAL_MEAN)
    else:
        rgb = (pixels * np.float32(CLIP_STD) + np.float32(CLIP_MEAN)) * 255.0
    return np.clip(np.rint(rgb[: hw[0], : hw[1]]), 0, 255).astype(np.uint8)


def write_overlays(directory: Path, kept: list[tuple[dict, np.ndarray]], hf_tokenizer, count: int,
                   normalization: str, scale: int = 4) -> list[Path]:
    """PNG per conversation: the image, then its predicted masks tinted and numbered (one palette colour
    per target, legend) with the ground truth outlined in the same colour.

    `index.json` gives each file's conversation text and per-target IoU; `index.html` shows them all
    together with a colour swatch and IoU per target.
    """
    directory.mkdir(parents=True, exist_ok=True)
    written, index = [], []
    for local, pred in kept:
        for j in np.flatnonzero(local["conv_valid"]):
            if len(written) == count:
                break
            row = int(local["conv_image"][j])
            hw = local["resized_hw"][row]
            image = _image(local["pixels"][row], hw, normalization)
            mh, mw = (int(v) for v in local["mask_hw"][row])
            targets = np.flatnonzero(local["mask_valid"][j])
            preds = [_resize_mask(pred[j, t, :mh, :mw], hw) for t in targets]
            truths = [_resize_mask(local["masks"][j, t, :mh, :mw], hw) for t in targets]
            ious = [float((p & g).sum() / (p | g).sum()) if (p | g).any() else 1.0 for p, g in zip(preds, truths)]
            shape = (len(targets), hw[0] * scale, hw[1] * scale)
            tinted = overlay(_upscale(scale, image), np.asarray([_upscale(scale, p) for p in preds], bool).reshape(shape))
            tinted = outlined(tinted, np.asarray([_upscale(scale, g) for g in truths], bool).reshape(shape))
            gap = np.full((hw[0] * scale, 2 * scale, 3), 255, np.uint8)
            path = directory / f"overlay_{len(written):02d}.png"
            Image.fromarray(np.concatenate([_upscale(scale, image), gap, np.asarray(tinted)], 1)).save(path)
            ids = [int(i) for i in local["input_ids"][j][local["attention_mask"][j]] if i >= 0]
            index.append({"file": path.name, "text": hf_tokenizer.decode(ids), "iou": ious})
            written.append(path)
    (directory / "index.json").write_text(json.dumps(index, indent=2))
    (directory / "index.html").write_text(overlay_page(index))
    return written


def overlay_page(index: list[dict]) -> str:
    """An HTML page of the overlays: each image with its conversation and one swatch and IoU per target."""
    items = []
    for entry in index:
        legend = "".join(
            f'<li><span style="background:rgb{PALETTE[k % len(PALETTE)]}">&nbsp;&nbsp;&nbsp;</span> '
            f"target {k + 1}: IoU {iou:.3f}</li>" for k, iou in enumerate(entry["iou"]))
        items.append(f'<figure><img src="{html.escape(entry["file"])}"><figcaption><pre>'
                     f'{html.escape(entry["text"])}</pre><ul>{legend}</ul></figcaption></figure>')
    return ("<!doctype html><meta charset=utf-8><title>overlays</title><style>figure{display:inline-block;"
            "vertical-align:top;max-width:44em;margin:1em}pre{white-space:pre-wrap}ul{list-style:none;padding:0}"
            "</style><p>Left: the image. Right: each predicted mask tinted and numbered, its ground truth "
            "outlined in the same colour.</p>" + "".join(items) + "\n")


def _upscale(scale: int, a: np.ndarray) -> np.ndarray:
    """Pixel replication, so the numbers and outlines drawn on a small image have room to be read."""
    return a.repeat(scale, 0).repeat(scale, 1)


def _resize_mask(mask: np.ndarray, hw) -> np.ndarray:
    h, w = int(hw[0]), int(hw[1])
    if mask.shape == (h, w):
        return mask.astype(bool)
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127
