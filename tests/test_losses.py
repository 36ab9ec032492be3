"""Losses against independent NumPy / torch references, with padded targets and several questions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from pixellm_jax.config import LossConfig
from pixellm_jax.losses import (
    dice_loss,
    mask_bce_loss,
    pixellm_loss,
    refinement_loss,
    refinement_weights,
    text_ce_loss,
)

# ------------------------------------------------------------------------------------------------
# NumPy reference (float64, loops over masks; each mask cut to its own image size)


def _np_bce(x, t):
    return np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))


def _np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _reference(x, t, valid, sizes, qid, alpha):
    """Per-mask losses over the image region sizes[k] = (h, w), averaged over valid masks."""
    bce, dice, ref = [], [], []
    for k in np.flatnonzero(valid):
        h, w = sizes[k]
        xk, tk = x[k, :h, :w].astype(np.float64), t[k, :h, :w].astype(np.float64)
        bce.append(_np_bce(xk, tk).mean())
        p = _np_sigmoid(xk)
        num = 2 * (p / 1000 * tk).sum()
        den = (p / 1000).sum() + (tk / 1000).sum()
        dice.append(1 - (num + 1e-6) / (den + 1e-6))
        peers = [j for j in np.flatnonzero(valid) if qid[j] == qid[k]]
        count = sum((x[j, :h, :w] > 0).astype(int) for j in peers)
        weight = np.where(count >= 2, alpha, 1.0)
        ref.append((weight * _np_bce(xk, tk)).mean())
    mean = lambda v: float(np.mean(v)) if v else 0.0  # noqa: E731
    return mean(bce), mean(dice), mean(ref)


def _np_overlap_term(x, t, valid, sizes, qid):
    """Official b25fff8 `overlap_loss`: BCE weight 1 on overlap pixels, 0 elsewhere."""
    out = []
    for k in np.flatnonzero(valid):
        h, w = sizes[k]
        peers = [j for j in np.flatnonzero(valid) if qid[j] == qid[k]]
        count = sum((x[j, :h, :w] > 0).astype(int) for j in peers)
        out.append(((count >= 2) * _np_bce(x[k, :h, :w].astype(np.float64), t[k, :h, :w])).mean())
    return float(np.mean(out))


@pytest.fixture(scope="module")
def batch():
    """Two images (sizes 20x24 and 14x9) on a 20x24 canvas; questions 0,1 on image A, 2 on image B."""
    rng = np.random.default_rng(0)
    n, hm, wm = 7, 20, 24
    sizes = np.array([[20, 24]] * 4 + [[14, 9]] * 3)
    qid = np.array([0, 0, 0, 1, 2, 2, 2])
    valid = np.array([True, True, True, True, True, False, True])
    x = (3.0 * rng.normal(size=(n, hm, wm)) + 0.5).astype(np.float32)
    t = (rng.random((n, hm, wm)) < 0.4).astype(np.float32)
    pix = np.zeros((n, hm, wm), bool)
    for k, (h, w) in enumerate(sizes):
        pix[k, :h, :w] = True
    # garbage outside the valid region and in the padded mask must not matter
    x[~pix] = 50.0
    t[~pix] = 0.0
    x[5] = -30.0
    return x, t, valid, pix, sizes, qid


def test_mask_losses_match_reference(batch):
    x, t, valid, pix, sizes, qid = batch
    bce_ref, dice_ref, ref_ref = _reference(x, t, valid, sizes, qid, alpha=2.5)
    @jax.jit
    def terms(x, t, valid, pix, qid):
        return (mask_bce_loss(x, t, valid, pix), dice_loss(x, t, valid, pix),
                refinement_loss(x, t, qid, 2.5, valid, pix))

    bce, dice, ref = terms(x, t, valid, pix, qid)
    np.testing.assert_allclose(bce, bce_ref, rtol=1e-5)
    np.testing.assert_allclose(dice, dice_ref, rtol=1e-5)
    np.testing.assert_allclose(ref, ref_ref, rtol=1e-5)
    # the overlap weighting really changes the value on this data
    assert abs(ref_ref - bce_ref) > 1e-2


def test_bce_and_dice_match_torch_official_forms(batch):
    """Unpadded single image: the official `sigmoid_ce_loss` and `dice_loss` formulas in torch."""
    x, t, _, _, _, _ = batch
    xs, ts = torch.from_numpy(x[:4].copy()), torch.from_numpy(t[:4].copy())
    bce = torch.nn.functional.binary_cross_entropy_with_logits(xs, ts, reduction="none")
    bce = bce.flatten(1, 2).mean(1).sum() / 4
    p = xs.sigmoid().flatten(1, 2)
    tf = ts.flatten(1, 2)
    dice = (1 - (2 * (p / 1000 * tf).sum(-1) + 1e-6) / ((p / 1000).sum(-1) + (tf / 1000).sum(-1) + 1e-6)).sum() / 4
    np.testing.assert_allclose(mask_bce_loss(x[:4], t[:4]), bce.item(), rtol=1e-5)
    np.testing.assert_allclose(dice_loss(x[:4], t[:4]), dice.item(), rtol=1e-5)


def test_refinement_equals_official_bce_plus_overlap(batch):
    """alpha = 2: the refinement loss is the official plain BCE plus its `overlap_loss` term."""
    x, t, valid, pix, sizes, qid = batch
    bce_ref, _, _ = _reference(x, t, valid, sizes, qid, alpha=2.0)
    overlap = _np_overlap_term(x, t, valid, sizes, qid)
    np.testing.assert_allclose(refinement_loss(x, t, qid, 2.0, valid, pix), bce_ref + overlap, rtol=1e-5)


def test_refinement_weights_hand_built():
    # 3 masks of question 0 and 1 of question 1, on a 1x6 strip; logit > 0 marked +.
    pos, neg = 1.0, -1.0
    x = np.array([
        [[pos, pos, neg, neg, pos, 0.0]],  # q0
        [[pos, neg, pos, neg, neg, pos]],  # q0
        [[neg, neg, pos, neg, neg, pos]],  # q0 (padded out below)
        [[pos, pos, pos, pos, pos, pos]],  # q1: alone, never overlaps
    ], np.float32)
    qid = np.array([0, 0, 0, 1])
    w = np.asarray(refinement_weights(x, qid, 3.0))
    q0 = [3.0, 1.0, 3.0, 1.0, 1.0, 3.0]  # counts 2,1,2,0,1,2 (logit 0 is not > 0)
    np.testing.assert_array_equal(w[:3, 0], [q0] * 3)
    np.testing.assert_array_equal(w[3, 0], [1.0] * 6)
    # mask 2 padded out: it no longer counts
    w = np.asarray(refinement_weights(x, qid, 3.0, valid=np.array([True, True, False, True])))
    np.testing.assert_array_equal(w[0, 0], [3.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    # pixel 0 outside the image region: no overlap counted there
    pix = np.ones_like(x, bool)
    pix[:, :, 0] = False
    w = np.asarray(refinement_weights(x, qid, 3.0, pixel_valid=pix))
    assert w[0, 0, 0] == 1.0 and w[0, 0, 2] == 3.0
    # same masks split into separate questions: no overlap at all
    w = np.asarray(refinement_weights(x, np.array([0, 1, 2, 3]), 3.0))
    np.testing.assert_array_equal(w, np.ones_like(x))


def test_refinement_counted_per_group_equals_the_batch_wide_count():
    # The model's layout: rows of m = 3 target slots, one question per row (question_id = row).
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4 * 3, 5, 7)).astype(np.float32)
    valid = rng.random(12) > 0.2
    pix = rng.random((12, 5, 7)) > 0.1
    qid = np.repeat(np.arange(4), 3)
    dense = np.asarray(refinement_weights(x, qid, 2.5, valid, pix))
    grouped = np.asarray(refinement_weights(x, qid, 2.5, valid, pix, group_size=3))
    assert (dense == 2.5).any() and (dense == 1.0).any()
    np.testing.assert_array_equal(grouped, dense)
    t = rng.random((12, 5, 7)) > 0.5
    np.testing.assert_array_equal(refinement_loss(x, t, qid, 2.5, valid, pix, group_size=3),
                                  refinement_loss(x, t, qid, 2.5, valid, pix))
    with pytest.raises(ValueError, match="12 masks do not split into groups of 5"):
        refinement_weights(x, qid, 2.5, group_size=5)


def test_text_ce_matches_torch():
    rng = np.random.default_rng(3)
    b, t, v = 3, 9, 17
    logits = (2.0 * rng.normal(size=(b, t, v))).astype(np.float32)
    labels = rng.integers(0, v, size=(b, t))
    labels[:, :4] = -100
    labels[2, 6:] = -100
    got = text_ce_loss(jnp.asarray(logits), jnp.asarray(labels))
    ref = torch.nn.CrossEntropyLoss()(
        torch.from_numpy(logits[:, :-1].reshape(-1, v)), torch.from_numpy(labels[:, 1:].reshape(-1)))
    np.testing.assert_allclose(got, ref.item(), rtol=1e-5)
    assert float(text_ce_loss(jnp.asarray(logits), jnp.full((b, t), -100))) == 0.0


def test_pixellm_loss_terms_and_weights(batch):
    x, t, valid, pix, sizes, qid = batch
    rng = np.random.default_rng(4)
    lm = rng.normal(size=(2, 6, 11)).astype(np.float32)
    labels = np.array([[-100, -100, 3, 4, 5, 2], [-100, -100, -100, 7, 2, -100]])
    cfg = LossConfig(ce_weight=1.0, bce_weight=2.0, dice_weight=0.5, refinement=False,
                     refinement_alpha=2.0, refinement_weight=3.0)
    out = jax.jit(lambda *a: pixellm_loss(*a[:4], valid=a[4], question_id=a[5], cfg=cfg, pixel_valid=a[6]))(
        lm, labels, x, t, valid, qid, pix)
    bce_ref, dice_ref, ref_ref = _reference(x, t, valid, sizes, qid, alpha=2.0)
    np.testing.assert_allclose(out["bce"], bce_ref, rtol=1e-5)
    np.testing.assert_allclose(out["dice"], dice_ref, rtol=1e-5)
    np.testing.assert_allclose(out["refine"], ref_ref, rtol=1e-5)
    np.testing.assert_allclose(out["total"], out["ce"] + 2.0 * bce_ref + 0.5 * dice_ref, rtol=1e-5)
    cfg.refinement = True
    out = pixellm_loss(lm, labels, x, t, valid=valid, question_id=qid, cfg=cfg, pixel_valid=pix)
    np.testing.assert_allclose(out["total"], out["ce"] + 3.0 * ref_ref + 0.5 * dice_ref, rtol=1e-5)


def test_zero_targets_are_finite_and_zero():
    cfg = LossConfig(refinement=True)
    lm = np.zeros((1, 4, 5), np.float32)
    labels = np.array([[-100, 1, 2, 3]])
    x = np.random.default_rng(5).normal(size=(2, 8, 8)).astype(np.float32)
    t = np.zeros_like(x)

    def total(x):
        out = pixellm_loss(lm, labels, x, t, valid=jnp.zeros(2, bool), question_id=jnp.zeros(2, jnp.int32),
                           cfg=cfg)
        return out["total"], out

    (value, out), grad = jax.jit(jax.value_and_grad(total, has_aux=True))(jnp.asarray(x))
    for k in ("bce", "dice", "refine"):
        assert float(out[k]) == 0.0
    np.testing.assert_allclose(value, np.log(5.0), rtol=1e-6)
    assert bool(jnp.all(grad == 0.0))
    # no masks at all
    none = np.zeros((0, 8, 8), np.float32)
    empty = jax.jit(lambda m: pixellm_loss(lm, labels, m, m, valid=np.zeros(0, bool),
                                           question_id=np.zeros(0, np.int32), cfg=cfg))(none)
    assert all(bool(jnp.isfinite(v)) for v in empty.values())
