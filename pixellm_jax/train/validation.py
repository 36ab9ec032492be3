"""Held-out evaluation during training: teacher-forced gIoU / cIoU and validation loss (overlays: overlays.py).

Teacher-forced: the model reads the ground-truth answer (so the number of targets is given) and each
codebook group's mask is compared with its target on the mask canvas, at the image's canvas
resolution `mask_hw`. Per target IoU = |pred ∩ gt| / |pred ∪ gt| with pred = logit > 0 (1 when both
are empty); gIoU is the mean over targets, cIoU the ratio of the summed intersections and unions.
Generation-based benchmark evaluation lives in the evaluation package; this is the cheap signal a
training run tracks and picks its best checkpoint by.
"""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pixellm_jax.config import Config
from pixellm_jax.objective import pixellm_objective
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
