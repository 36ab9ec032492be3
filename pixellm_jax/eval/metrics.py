"""Segmentation metrics: referring gIoU / cIoU, and MUSE's Hungarian-matched multi-target metrics.

All functions work on host numpy masks at the image's original resolution. A metric over no target
(no pair) is None, JSON null: a split that scored nothing has no score, neither 1 nor 0.

Referring (refCOCO/+/g, multi-referring; official `validate`, reference §6). Per target, the
foreground intersection I and union U of the binary prediction (logit > 0) and the ground truth;
IoU = I / (U + 1e-5), or 1 when U = 0 (an empty prediction of an empty target). gIoU is the mean IoU
over all targets, cIoU = ΣI / (ΣU + 1e-10).

MUSE (official `ar_validate` + `match_pred`, reference §6). Per question, P predicted masks are
matched to G ground-truth masks by `scipy.optimize.linear_sum_assignment` on the cost
mean point BCE + dice (+1 smoothing), both on 12,544 points sampled uniformly in the image and read
bilinearly (grid_sample, align_corners=False, zeros outside) from the prediction logits and the
ground-truth masks. The official points are `torch.rand`, unseeded; here they come from
`np.random.default_rng([seed, *key])`, so a question's points depend only on the seed and its key.
Each question then yields max(P, G) pairs: the matched ones, each unmatched ground truth with an
empty prediction, and each unmatched prediction with an empty ground truth. Two metrics:

* `corrected`: every prediction is thresholded at logit > 0; IoU = I / U (1 when U = 0);
  gIoU = ΣIoU / number of pairs, cIoU = ΣI / ΣU, over all pairs of the split.
* `official`: the released code's numbers. Matched predictions are thresholded, but an unmatched
  prediction is left as raw logits and measured with `torch.histc` over [0, 1] in two bins, so its
  foreground area is the number of pixels with 0.5 <= logit <= 1 and its intersection is 0: a
  spurious prediction usually scores IoU = 1 (empty union) instead of 0. IoU = I / (U + 1e-5) + [U = 0].
  gIoU divides the image's IoU sum by max(#predictions, #ground truths) over *all* questions of the
  image, not by its number of pairs (so it can exceed 1); cIoU = ΣI / (ΣU + 1e-10).

Not in the official code: `exact_targets`, the share of questions answered with exactly the right
targets — as many predictions as ground truths, each matched pair at corrected IoU >= 0.5. It tells a
model that names the wrong objects (or too few) from one that names the right ones with loose masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

NUM_POINTS = 12544  # official match_pred
EXACT_IOU = 0.5  # a matched target counts as found at this IoU (exact_targets)


def intersection_union(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    """Foreground intersection and union of two boolean masks of one shape."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    pred, gt = pred.astype(bool), gt.astype(bool)
    return int(np.count_nonzero(pred & gt)), int(np.count_nonzero(pred | gt))


def official_iou(intersection: float, union: float) -> float:
    """The official per-target IoU: I / (U + 1e-5), plus 1 when U = 0."""
    return intersection / (union + 1e-5) + (1.0 if union == 0 else 0.0)


def exact_iou(intersection: float, union: float) -> float:
    """I / U, with an empty union counted as 1."""
    return 1.0 if union == 0 else intersection / union


@dataclass
class ReferringMeter:
    """Accumulates referring targets; the sums are what distributed runs add up across processes."""

    iou_sum: float = 0.0
    targets: int = 0
    intersection: float = 0.0
    union: float = 0.0

    def add(self, intersection: int, union: int) -> float:
        iou = official_iou(intersection, union)
        self.iou_sum += iou
        self.targets += 1
        self.intersection += intersection
        self.union += union
        return iou

    def sums(self) -> np.ndarray:
        return np.array([self.iou_sum, self.targets, self.intersection, self.union], np.float64)

    @staticmethod
    def result(sums: np.ndarray) -> dict[str, float | None]:
        """gIoU and cIoU of the summed targets; None (JSON null) over no target, never a fake score."""
        iou_sum, targets, inter, union = (float(x) for x in sums)
        if not targets:
            return {"giou": None, "ciou": None, "targets": 0}
        return {"giou": iou_sum / targets, "ciou": inter / (union + 1e-10), "targets": int(targets)}


# ---------------------------------------------------------------------------------------------
# MUSE matching


def sample_points(seed: int, key: Sequence[int], num_points: int = NUM_POINTS) -> np.ndarray:
    """[P, 2] (x, y) points uniform in [0, 1)², a function of the seed and the question's key."""
    return np.random.default_rng([int(seed), *(int(k) for k in key)]).random((num_points, 2))


def point_sample(maps: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Bilinear values [n, P] of maps [n, H, W] at points [P, 2] in [0, 1]² (x, y).

    torch `grid_sample(maps, 2·points − 1, align_corners=False)`: pixel coordinate x·W − 0.5, and
    neighbours outside the map contribute 0.
    """
    n, h, w = maps.shape
    ix = points[:, 0] * w - 0.5
    iy = points[:, 1] * h - 0.5
    x0, y0 = np.floor(ix).astype(np.int64), np.floor(iy).astype(np.int64)
    fx, fy = ix - x0, iy - y0
    out = np.zeros((n, len(points)), np.float64)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yy, xx = y0 + dy, x0 + dx
            inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            vals = maps[:, np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)].astype(np.float64)
            out += np.where(inside, vals, 0.0) * (wy * wx)
    return out


def match_cost(pred_logits: np.ndarray, gt: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Official matching cost [P, G]: mean point BCE-with-logits + dice loss (+1 smoothing)."""
    x = point_sample(pred_logits, points)  # [P, n]
    t = point_sample(gt.astype(np.float64), points)  # [G, n]
    pos = np.logaddexp(0.0, -x)  # BCE against 1
    neg = np.logaddexp(0.0, x)  # BCE against 0
    ce = (pos @ t.T + neg @ (1.0 - t).T) / x.shape[1]
    p = 1.0 / (1.0 + np.exp(-x))
    dice = 1.0 - (2.0 * (p @ t.T) + 1.0) / (p.sum(1)[:, None] + t.sum(1)[None, :] + 1.0)
    return ce + dice


def hungarian(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost one-to-one assignment (pred indices, gt indices), sorted by prediction."""
    if cost.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rows, cols = linear_sum_assignment(cost)
    return rows.astype(np.int64), cols.astype(np.int64)


class Pair(NamedTuple):
    pred: int | None  # prediction index, None for an unmatched ground truth
    gt: int | None  # ground-truth index, None for an unmatched prediction
    intersection: int
    union: int
    iou: float


class QuestionMatch(NamedTuple):
    """One question's matching and its pairs under both metrics."""

    pred_to_gt: list[tuple[int, int]]  # matched (prediction, ground truth) indices
    corrected: list[Pair]
    official: list[Pair]


def match_question(
    pred_logits: np.ndarray, gt: np.ndarray, seed: int, key: Sequence[int], num_points: int = NUM_POINTS
) -> QuestionMatch:
    """Match predictions [P, H, W] (logits) to ground truths [G, H, W] (bool) and score the pairs."""
    if pred_logits.shape[1:] != gt.shape[1:]:
        raise ValueError(f"predictions {pred_logits.shape} and ground truths {gt.shape} differ in size")
    pred_bin = pred_logits > 0
    rows, cols = np.zeros(0, np.int64), np.zeros(0, np.int64)
    if len(pred_logits) and len(gt):
        rows, cols = hungarian(match_cost(pred_logits, gt, sample_points(seed, key, num_points)))
    corrected, official = [], []
    for r, c in zip(rows, cols):
        i, u = intersection_union(pred_bin[r], gt[c])
        corrected.append(Pair(int(r), int(c), i, u, exact_iou(i, u)))
        official.append(Pair(int(r), int(c), i, u, official_iou(i, u)))
    for c in sorted(set(range(len(gt))) - set(cols.tolist())):
        u = int(np.count_nonzero(gt[c]))
        corrected.append(Pair(None, c, 0, u, exact_iou(0, u)))
        official.append(Pair(None, c, 0, u, official_iou(0, u)))
    for r in sorted(set(range(len(pred_logits))) - set(rows.tolist())):
        u = int(np.count_nonzero(pred_bin[r]))
        corrected.append(Pair(r, None, 0, u, exact_iou(0, u)))
        # histc over [0, 1]: the raw logits' foreground bin is [0.5, 1]; nothing intersects an empty GT.
        u_raw = int(np.count_nonzero((pred_logits[r] >= 0.5) & (pred_logits[r] <= 1.0)))
        official.append(Pair(r, None, 0, u_raw, official_iou(0, u_raw)))
    return QuestionMatch([(int(r), int(c)) for r, c in zip(rows, cols)], corrected, official)


@dataclass
class MuseMeter:
    """Accumulates matched questions; `sums()` are what distributed runs add up across processes.

    Official gIoU needs each image's questions together (its normaliser is per image), so questions
    are added with their image key and an image's normaliser is counted when `close_image` is called.
    """

    corrected: np.ndarray = field(default_factory=lambda: np.zeros(4))  # iou sum, pairs, I, U
    official: np.ndarray = field(default_factory=lambda: np.zeros(4))  # iou sum, normaliser, I, U
    # predictions, ground truths, matched, questions, questions whose targets are exactly right
    counts: np.ndarray = field(default_factory=lambda: np.zeros(5))
    _image: tuple[int, int] = (0, 0)  # predictions and ground truths of the open image

    def add(self, match: QuestionMatch, num_pred: int, num_gt: int) -> None:
        for p in match.corrected:
            self.corrected += (p.iou, 1, p.intersection, p.union)
        for p in match.official:
            self.official += (p.iou, 0, p.intersection, p.union)
        exact = num_pred == num_gt and all(p.iou >= EXACT_IOU for p in match.corrected)
        self.counts += (num_pred, num_gt, len(match.pred_to_gt), 1, exact)
        self._image = (self._image[0] + num_pred, self._image[1] + num_gt)

    def close_image(self) -> None:
        self.official[1] += max(self._image)
        self._image = (0, 0)

    def sums(self) -> np.ndarray:
        return np.concatenate([self.corrected, self.official, self.counts])

    @staticmethod
    def result(sums: np.ndarray) -> dict[str, object]:
        """Both metrics of the summed questions; None (JSON null) over no pair, never a fake score."""
        c, o, n = sums[:4], sums[4:8], sums[8:]
        scored = bool(c[1])
        return {
            "corrected": {"giou": c[0] / c[1] if scored else None,
                          "ciou": (c[2] / c[3] if c[3] else 1.0) if scored else None, "pairs": int(c[1])},
            "official": {"giou": o[0] / o[1] if o[1] else None, "ciou": o[2] / (o[3] + 1e-10) if scored else None,
                         "normaliser": int(o[1])},
            "predictions": int(n[0]), "ground_truths": int(n[1]), "matched": int(n[2]),
            "questions": int(n[3]), "exact_targets": n[4] / n[3] if n[3] else None,
        }

