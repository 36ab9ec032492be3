"""Metrics against hand-computed values on constructed masks, and matching with known optima."""

import numpy as np
import pytest
import torch

from pixellm_jax.eval.metrics import (
    MuseMeter, ReferringMeter, hungarian, intersection_union, match_cost, match_question, official_iou,
    point_sample, sample_points,
)
from pixellm_jax.eval.teacher_forced import score_referring

H, W = 12, 16


def box(y0, y1, x0, x1):
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def logits_of(mask, inside=4.0, outside=-4.0):
    return np.where(mask, inside, outside).astype(np.float32)


def test_referring_giou_ciou_by_hand():
    gt = np.stack([box(0, 4, 0, 4), box(0, 2, 0, 2), np.zeros((H, W), bool), box(5, 7, 5, 7)])
    pred = np.stack([box(0, 4, 2, 6), np.zeros((H, W), bool), np.zeros((H, W), bool), box(5, 7, 5, 7)])
    # target 0: I = 8, U = 24; target 1: empty prediction, I = 0, U = 4; target 2: both empty; 3: exact
    assert intersection_union(pred[0], gt[0]) == (8, 24)
    meter = ReferringMeter()
    records = score_referring(gt, logits_of(pred), num_pred=4, meter=meter)
    assert [r["iou"] for r in records] == pytest.approx([8 / (24 + 1e-5), 0.0, 1.0, 4 / (4 + 1e-5)])
    result = ReferringMeter.result(meter.sums())
    assert result["giou"] == pytest.approx((8 / 24 + 0 + 1 + 1) / 4, abs=1e-6)
    assert result["ciou"] == pytest.approx((8 + 0 + 0 + 4) / (24 + 4 + 0 + 4), abs=1e-9)
    assert result["targets"] == 4


def test_referring_missing_predictions_are_empty_masks():
    gt = np.stack([box(0, 4, 0, 4), box(6, 8, 6, 8)])
    meter = ReferringMeter()
    # logits on a larger canvas than the image; only one predicted target for two ground truths
    canvas = np.full((3, H + 4, W + 4), -1.0, np.float32)
    canvas[0, :H, :W] = logits_of(gt[0])
    records = score_referring(gt, canvas[:1], num_pred=1, meter=meter)
    assert [(r["pred"], r["intersection"], r["union"]) for r in records] == [(0, 16, 16), (None, 0, 4)]


def test_point_sample_equals_torch_grid_sample():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(3, 7, 9)).astype(np.float32)
    points = np.concatenate([sample_points(5, (1, 2), 200), [[0.0, 0.0], [0.999, 0.999], [0.5, 0.0]]])
    ours = point_sample(maps, points)
    grid = torch.tensor(2 * points - 1, dtype=torch.float64)[None, :, None].repeat(3, 1, 1, 1)
    ref = torch.nn.functional.grid_sample(torch.tensor(maps, dtype=torch.float64)[:, None], grid,
                                          align_corners=False)[:, 0, :, 0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-9)


def test_points_are_seeded():
    a, b = sample_points(0, (3, 1)), sample_points(0, (3, 1))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (12544, 2) and a.min() >= 0 and a.max() < 1
    assert not np.array_equal(a, sample_points(0, (3, 2)))


def test_match_cost_by_hand_and_known_optimum():
    # constant maps: point sampling returns the constant except at the border (zeros padding)
    gt = np.stack([box(0, H, 0, W), box(0, H, 0, W)])
    x = np.full((1, H, W), 2.0)
    pts = np.array([[0.5, 0.5], [0.25, 0.75]])  # interior points: no border effect
    cost = match_cost(x, gt, pts)
    p = 1 / (1 + np.exp(-2.0))
    expected = np.log1p(np.exp(-2.0)) + 1 - (2 * 2 * p + 1) / (2 * p + 2 + 1)
    np.testing.assert_allclose(cost, [[expected, expected]], rtol=1e-12)

    masks = [box(0, 4, 0, 4), box(0, 4, 8, 16), box(6, 12, 0, 6), box(8, 12, 10, 16)]
    gt = np.stack(masks)
    perm = [2, 0, 3, 1]
    preds = np.stack([logits_of(masks[i]) for i in perm])
    rows, cols = hungarian(match_cost(preds, gt, sample_points(0, (0,))))
    assert rows.tolist() == [0, 1, 2, 3] and cols.tolist() == perm
    assert hungarian(np.zeros((0, 3)))[0].size == 0


def test_match_question_more_predictions_than_targets():
    gt = np.stack([box(0, 4, 0, 4), box(6, 12, 8, 16)])
    spurious_confident = np.where(box(8, 12, 0, 4), 3.0, -3.0)  # thresholded non-empty, no logit in [0.5, 1]
    spurious_mid = np.where(box(0, 2, 10, 16), 0.7, -3.0)  # 12 logits in [0.5, 1]
    preds = np.stack([logits_of(box(6, 12, 8, 14)), spurious_confident, logits_of(box(0, 4, 0, 4)), spurious_mid])
    m = match_question(preds.astype(np.float32), gt, seed=0, key=(0, 0))
    assert sorted(m.pred_to_gt) == [(0, 1), (2, 0)]
    by_pred = {p.pred: p for p in m.corrected}
    assert (by_pred[0].intersection, by_pred[0].union, by_pred[0].iou) == (36, 48, 0.75)
    assert by_pred[2].iou == 1.0
    assert (by_pred[1].gt, by_pred[1].union, by_pred[1].iou) == (None, 16, 0.0)
    assert (by_pred[3].gt, by_pred[3].union, by_pred[3].iou) == (None, 12, 0.0)
    official = {p.pred: p for p in m.official}
    assert official[0].iou == pytest.approx(36 / (48 + 1e-5))
    assert (official[1].union, official[1].iou) == (0, 1.0)  # raw logits never in [0.5, 1]: counted perfect
    assert (official[3].union, official[3].iou) == (12, 0.0)


def test_match_question_fewer_predictions_and_none():
    gt = np.stack([box(0, 4, 0, 4), box(6, 12, 8, 16), np.zeros((H, W), bool)])
    m = match_question(logits_of(box(6, 12, 8, 16))[None], gt, seed=0, key=(1, 0))
    assert m.pred_to_gt == [(0, 1)]
    assert [(p.pred, p.gt, p.iou) for p in m.corrected] == [(0, 1, 1.0), (None, 0, 0.0), (None, 2, 1.0)]
    none = match_question(np.zeros((0, H, W), np.float32), gt, seed=0, key=(2, 0))
    assert [(p.pred, p.gt, p.union) for p in none.corrected] == [(None, 0, 16), (None, 1, 48), (None, 2, 0)]


def test_muse_meter_official_normaliser_is_per_image():
    gt1 = np.stack([box(0, 4, 0, 4)])
    q1 = match_question(np.stack([logits_of(box(0, 4, 0, 4)), logits_of(box(8, 12, 8, 12))]), gt1, 0, (0, 0))
    gt2 = np.stack([box(0, 6, 0, 6), box(6, 12, 6, 12)])
    q2 = match_question(np.zeros((0, H, W), np.float32), gt2, 0, (0, 1))
    meter = MuseMeter()
    meter.add(q1, 2, 1)
    meter.add(q2, 0, 2)
    meter.close_image()
    r = MuseMeter.result(meter.sums())
    # corrected: pairs (perfect 1.0), (spurious pred, 0), (empty pred vs gt 36, 0), (empty pred vs gt 36, 0)
    assert r["corrected"]["pairs"] == 4 and r["corrected"]["giou"] == pytest.approx(0.25)
    assert r["corrected"]["ciou"] == pytest.approx(16 / (16 + 16 + 36 + 36))
    # official: the spurious prediction's raw logits (4.0 / -4.0) have no value in [0.5, 1] -> IoU 1, U 0;
    # the image's normaliser is max(2 predictions, 3 ground truths) = 3, not its 4 pairs
    assert r["official"]["normaliser"] == 3
    assert r["official"]["giou"] == pytest.approx((16 / (16 + 1e-5) + 1.0) / 3)
    assert r["official"]["ciou"] == pytest.approx(16 / (16 + 36 + 36 + 1e-10))
    assert (r["predictions"], r["ground_truths"], r["matched"]) == (2, 3, 1)
    assert r["questions"] == 2 and r["exact_targets"] == 0.0  # a spurious prediction, then none
    exact = MuseMeter()
    exact.add(match_question(logits_of(box(0, 4, 0, 4))[None], gt1, 0, (1, 0)), 1, 1)  # right target
    exact.add(match_question(logits_of(box(0, 12, 0, 12))[None], gt1, 0, (1, 1)), 1, 1)  # IoU 16/144
    assert MuseMeter.result(exact.sums())["exact_targets"] == 0.5
    assert MuseMeter.result(MuseMeter().sums())["exact_targets"] is None
    assert official_iou(0, 0) == 1.0
