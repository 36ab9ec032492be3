"""Training losses: text cross-entropy, mask BCE, dice and the target refinement loss (reference §3).

Masks arrive padded: `mask_logits` / `mask_targets` [n, H, W] on a common canvas, `valid` [n] marks
real targets, `pixel_valid` [n, H, W] the pixels inside each mask's image, `question_id` [n] the
question each mask answers. Padded targets and pixels contribute nothing; with no valid mask every
mask term is 0 (no NaN). All losses are computed in float32.

Normalisation follows the official code: a mask's BCE (or dice) is its own pixel mean, and the batch
value is the mean over all valid masks of the micro-batch (official: ×n_i per image, ÷ total masks;
its extra 1e-8 in the denominator is left out).

Target refinement (paper §3.2): per-pixel weight A = α where at least two predicted masks
(logit > 0) of the same question cover the pixel, 1 elsewhere; L_ref = mean over masks of the
pixel mean of A·BCE (the paper's 1/(KHW)·Σ_k Σ_i A_i·BCE when all masks share one size).
It replaces the plain BCE in the total when enabled:
total = ce_w·CE + ref_w·L_ref + dice_w·dice (paper: L_txt + λ_ref L_ref + λ_dice L_dice).
Relation to the official `overlap_loss` (commit b25fff8, disabled at HEAD): that term is BCE with
weight 1 on overlap pixels and 0 elsewhere, normalised like BCE and weighted by bce_weight, and it
is *added* to the plain BCE: bce_w·(BCE + overlap) = bce_w·L_ref with α = 2. So refinement on with
α = 2 and refinement_weight = bce_weight = 2 (the supplement's α and λ_ref) reproduces that official
mask term exactly. The official per-question split had an operator-precedence bug (count // N*L,
issues #12/#16/#24); here the questions come from `question_id`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from pixellm_jax.config import LossConfig
from pixellm_jax.tokens import IGNORE_INDEX


def text_ce_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """HF causal-LM loss: logits [B, T, V] at t predict labels [B, T] at t+1; −100 is ignored.

    Mean over every supervised token of the batch; 0 when there is none (torch would give NaN).
    The labels are shifted, not the logits: slicing [B, T, V] logits copies them, and its gradient
    (a pad) copies them again, about 4% of a train step on CPU.
    """
    targets = jnp.pad(labels[:, 1:], ((0, 0), (0, 1)), constant_values=IGNORE_INDEX)
    keep = targets != IGNORE_INDEX
    per_token = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), jnp.where(keep, targets, 0))
    return jnp.where(keep, per_token, 0.0).sum() / jnp.maximum(keep.sum(), 1)


def _prepare(logits, targets, valid, pixel_valid):
    x = logits.astype(jnp.float32)
    t = targets.astype(jnp.float32)
    valid = jnp.ones(x.shape[:1], bool) if valid is None else valid.astype(bool)
    pix = jnp.ones(x.shape, bool) if pixel_valid is None else pixel_valid.astype(bool)
    return x, t, valid, pix


def _mean_over_masks(per_mask: jax.Array, valid: jax.Array) -> jax.Array:
    return jnp.where(valid, per_mask, 0.0).sum() / jnp.maximum(valid.sum(), 1)


def _weighted_bce(x, t, valid, pix, weight) -> jax.Array:
    per_pixel = jnp.where(pix, weight * optax.sigmoid_binary_cross_entropy(x, t), 0.0)
    per_mask = per_pixel.sum(axis=(1, 2)) / jnp.maximum(pix.sum(axis=(1, 2)), 1)
    return _mean_over_masks(per_mask, valid)


def mask_bce_loss(logits: jax.Array, targets: jax.Array, valid: jax.Array | None = None,
                  pixel_valid: jax.Array | None = None) -> jax.Array:
    """Mean over valid masks of each mask's mean BCE-with-logits over its valid pixels (unweighted)."""
    x, t, valid, pix = _prepare(logits, targets, valid, pixel_valid)
    return _weighted_bce(x, t, valid, pix, 1.0)


def dice_loss(logits: jax.Array, targets: jax.Array, valid: jax.Array | None = None,
              pixel_valid: jax.Array | None = None, scale: float = 1000.0, eps: float = 1e-6) -> jax.Array:
    """Official dice, p = sigmoid(x): 1 − (2Σ(p/s·t) + ε) / (Σ p/s + Σ t/s + ε) per mask, mean over masks."""
    x, t, valid, pix = _prepare(logits, targets, valid, pixel_valid)
    p = jnp.where(pix, jax.nn.sigmoid(x) / scale, 0.0)
    t = jnp.where(pix, t, 0.0)
    numerator = 2.0 * (p * t).sum(axis=(1, 2))
    denominator = p.sum(axis=(1, 2)) + (t / scale).sum(axis=(1, 2))
    per_mask = 1.0 - (numerator + eps) / (denominator + eps)
    return _mean_over_masks(per_mask, valid)


def refinement_weights(logits: jax.Array, question_id: jax.Array, alpha: float,
                       valid: jax.Array | None = None, pixel_valid: jax.Array | None = None,
                       group_size: int | None = None) -> jax.Array:
    """Per-pixel weights A [n, H, W]: α where ≥ 2 valid masks of the mask's question have logit > 0.

    The overlap count runs over the valid masks of the same question at valid pixels; the weights
    are constants (no gradient flows through the binarised predictions). `group_size` g says the masks
    come in consecutive groups of g that share no question with another group (the model's layout:
    one question per conversation row of `max_targets` slots); the count then stays within each group,
    the same numbers without a contraction over the whole batch (which, sharded, gathers every mask).
    """
    x, _, valid, pix = _prepare(logits, logits, valid, pixel_valid)
    positive = ((x > 0) & pix & valid[:, None, None]).astype(jnp.float32)
    n = positive.shape[0]
    g = group_size or max(n, 1)
    if n % g:
        raise ValueError(f"{n} masks do not split into groups of {g}")
    qid = question_id.reshape(-1, g)
    same = (qid[:, :, None] == qid[:, None, :]).astype(jnp.float32)
    count = jnp.einsum("qij,qjhw->qihw", same, positive.reshape(qid.shape + positive.shape[1:]),
                       precision=jax.lax.Precision.HIGHEST).reshape(positive.shape)
    return jax.lax.stop_gradient(jnp.where(count >= 2.0, jnp.float32(alpha), jnp.float32(1.0)))


def refinement_loss(logits: jax.Array, targets: jax.Array, question_id: jax.Array, alpha: float,
                    valid: jax.Array | None = None, pixel_valid: jax.Array | None = None,
                    group_size: int | None = None) -> jax.Array:
    """Target refinement loss: BCE weighted by `refinement_weights`, normalised like `mask_bce_loss`."""
    x, t, valid, pix = _prepare(logits, targets, valid, pixel_valid)
    weight = refinement_weights(x, question_id, alpha, valid, pix, group_size)
    return _weighted_bce(x, t, valid, pix, weight)


def pixellm_loss(
    lm_logits: jax.Array,
    labels: jax.Array,
    mask_logits: jax.Array,
    mask_targets: jax.Array,
    *,
    valid: jax.Array,
    question_id: jax.Array,
    cfg: LossConfig,
    pixel_valid: jax.Array | None = None,
    group_size: int | None = None,
) -> dict[str, jax.Array]:
    """All loss terms (unweighted `ce`, `bce`, `dice`, `refine`) and the weighted `total`.

    total = ce_weight·ce + dice_weight·dice + (refinement_weight·refine if cfg.refinement
    else bce_weight·bce). `refine` is always computed (with cfg.refinement_alpha) for monitoring.
    `group_size`: see `refinement_weights`.
    """
    ce = text_ce_loss(lm_logits, labels)
    bce = mask_bce_loss(mask_logits, mask_targets, valid, pixel_valid)
    dice = dice_loss(mask_logits, mask_targets, valid, pixel_valid)
    refine = refinement_loss(mask_logits, mask_targets, question_id, cfg.refinement_alpha, valid, pixel_valid,
                             group_size)
    mask_term = cfg.refinement_weight * refine if cfg.refinement else cfg.bce_weight * bce
    total = cfg.ce_weight * ce + cfg.dice_weight * dice + mask_term
    return {"ce": ce, "bce": bce, "dice": dice, "refine": refine, "total": total}
