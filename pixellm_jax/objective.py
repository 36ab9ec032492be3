"""The training objective of a whole batch: forward, mask post-processing, loss terms.

Batch schema (numpy or jax arrays; Q conversations over B images, M = head.max_targets):
  pixels [B,S,S,3] f32, resized_hw [B,2] i32, mask_hw [B,2] i32 (resolution of the image's masks on
  the canvas), input_ids / attention_mask / labels [Q,T], conv_image [Q] i32, conv_valid [Q] bool,
  masks [Q,M,C,C] bool, mask_valid [Q,M] bool (the schema of `pixellm_jax.data.pipeline`).

A conversation whose codebook groups do not match its ground-truth targets (a malformed answer, an
overflow, or a count mismatch) contributes no mask loss and is counted in `seg_mismatch`: the
official code asserts instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pixellm_jax.config import LossConfig
from pixellm_jax.losses import pixellm_loss
from pixellm_jax.models.pixellm import PixelLM, PixelLMOutput
from pixellm_jax.postprocess import target_masks


def pixellm_objective(
    model: PixelLM, batch: dict, loss_cfg: LossConfig, *, deterministic: bool = True, image_groups: int = 1
) -> tuple[jax.Array, dict[str, jax.Array], PixelLMOutput]:
    """(total loss, metrics, outputs) for one batch; differentiable in the model's parameters.

    `image_groups`: the aligned blocks the batch is packed in (`models.grouped_take`), 1 for any batch.
    """
    out = model(batch["pixels"], batch["resized_hw"], batch["input_ids"], batch["attention_mask"],
                batch["conv_image"], batch["labels"], deterministic=deterministic, image_groups=image_groups)
    q, m = out.mask_logits.shape[:2]
    targets = jnp.asarray(batch["masks"])
    canvas = targets.shape[-2:]
    logits, pixel_valid = target_masks(out.mask_logits, batch["resized_hw"], batch["mask_hw"], batch["conv_image"],
                                       canvas, model.cfg.vision.image_size, image_groups)
    gt_valid = jnp.asarray(batch["mask_valid"]) & jnp.asarray(batch["conv_valid"])[:, None]
    matches = (out.seg.num_targets == gt_valid.sum(-1)) & ~out.seg.malformed & ~out.seg.overflow
    valid = out.seg.valid & gt_valid & matches[:, None]
    terms = pixellm_loss(
        out.logits, out.labels, logits.reshape(q * m, *canvas), targets.reshape(q * m, *canvas),
        valid=valid.reshape(-1), question_id=out.seg.question_id.reshape(-1), cfg=loss_cfg,
        pixel_valid=pixel_valid.reshape(q * m, *canvas), group_size=m,  # one question per conversation row of m target slots
    )
    metrics = dict(terms)
    metrics["num_masks"] = valid.sum()
    metrics["seg_mismatch"] = (jnp.asarray(batch["conv_valid"]) & ~matches & (gt_valid.any(-1) | (out.seg.num_targets > 0))).sum()
    return terms["total"], metrics, out
