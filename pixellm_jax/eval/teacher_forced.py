"""Referring evaluation as the official protocol: a teacher-forced forward, then per-target IoU.

Reference §6 (`validate`): every referring expression of an image is a conversation whose answer is
given ("[SEG]." for single referring; "[SEG], [SEG] and [SEG]." for multi-referring, the
codebook tokens written in), the model runs its training forward (`model(...)`) on it, and the mask
of each codebook group is compared with that expression's ground truth at the original resolution.
The k-th predicted target of a row is the k-th target of its answer. A row whose answer yields fewer
targets than it has ground truths (a malformed answer, or more targets than `model.head.max_targets`)
scores the missing ones as empty predictions, and they are counted (`targets_without_prediction`).
"""

from __future__ import annotations

import jax
import numpy as np

from pixellm_jax.eval.metrics import ReferringMeter, intersection_union
from pixellm_jax.models.pixellm import PixelLM
from pixellm_jax.postprocess import target_masks


def teacher_forced_outputs(
    model: PixelLM, arrays: dict, out_hw: tuple[int, int], image_groups: int = 1
) -> dict[str, jax.Array]:
    """Device step: the forward pass on an evaluation batch, masks at original size."""
    out = model(arrays["pixels"], arrays["resized_hw"], arrays["input_ids"], arrays["attention_mask"],
                arrays["conv_image"], image_groups=image_groups)
    return {
        "mask_logits": target_masks(out.mask_logits, arrays["resized_hw"], arrays["original_hw"], arrays["conv_image"],
                                    out_hw, model.cfg.vision.image_size, image_groups)[0],
        "num_targets": out.seg.num_targets,
        "malformed": out.seg.malformed,
    }


def score_referring(gt: np.ndarray, logits: np.ndarray, num_pred: int, meter: ReferringMeter) -> list[dict]:
    """Per-target records of one row: gt [k, H, W] bool, logits [M, H', W'] on the canvas."""
    h, w = gt.shape[1:]
    records = []
    for k in range(gt.shape[0]):
        pred = logits[k, :h, :w] > 0 if k < min(num_pred, len(logits)) else np.zeros((h, w), bool)
        inter, union = intersection_union(pred, gt[k])
        iou = meter.add(inter, union)
        records.append({"gt": k, "pred": k if k < num_pred else None, "intersection": inter, "union": union,
                        "iou": iou})
    return records
