"""Probes of why a small PixelLM does (not) learn multi-target segmentation (issue 15; docs/MULTI_TARGET.md).

On held-out synthetic scenes, teacher-forced with the reference answers of multi-target questions:
  * prompts: cosine between the fused [SEG] prompt embeddings of different targets of one answer, and
    between targets of different images (the floor a collapsed prompt reaches);
  * masks: IoU of each predicted mask with its target, with the union of all shapes ("mark every
    shape"), with the other targets' predicted masks in the same answer (does the decoder's output
    depend on its prompt?), and how often a mask's best-matching shape is its own target; small and
    large targets separately (64 px input shrinks a small shape to a few pixels);
  * vision features: a ridge-regression linear probe from each CLIP patch feature (deep and shallow
    level, and the decoder's neck features) to the patch's majority colour and shape kind, fitted on
    half the scenes and scored on the other half — do the features separate what the questions need?

    python tools/probe_multitarget.py --checkpoint runs/demo/checkpoints/2000 --scenes 60

Prints a table and writes one JSON line (stdout, or --out FILE).
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import combinations
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pixellm_jax.data.sample import IMAGE_PLACEHOLDER  # noqa: E402
from pixellm_jax.data.synthetic import COLOURS, SHAPES, SyntheticShapes  # noqa: E402
from pixellm_jax.predictor import Predictor  # noqa: E402

PROBE_SEED = 2_000_003  # scenes no training run draws


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def patch_labels(scene, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Majority colour (0 = background, 1.. = COLOURS) and kind (0 = background, 1.. = SHAPES) of each
    patch of a grid x grid tiling of the scene."""
    h, w = scene.image.shape[:2]
    colour = np.zeros((h, w), int)
    kind = np.zeros((h, w), int)
    for s, vis in zip(scene.shapes, scene.visible):
        colour[vis] = 1 + list(COLOURS).index(s.colour)
        kind[vis] = 1 + SHAPES.index(s.kind)
    ys = (np.arange(h) * grid) // h
    xs = (np.arange(w) * grid) // w
    out = []
    for label in (colour, kind):
        cells = np.zeros((grid * grid,), int)
        for gy in range(grid):
            for gx in range(grid):
                block = label[np.ix_(ys == gy, xs == gx)].ravel()
                cells[gy * grid + gx] = np.bincount(block).argmax()
        out.append(cells)
    return out[0], out[1]


def ridge_accuracy(x: np.ndarray, y: np.ndarray, split: int, lam: float = 1e-2) -> float:
    """Accuracy on rows [split:] of a one-vs-all ridge classifier fitted on rows [:split]."""
    x = np.concatenate([x, np.ones((len(x), 1))], 1)
    mu, sd = x[:split].mean(0), x[:split].std(0) + 1e-6
    sd[-1], mu[-1] = 1.0, 0.0
    x = (x - mu) / sd
    classes = np.unique(y[:split])
    targets = (y[:split, None] == classes[None]).astype(float) * 2 - 1
    w = np.linalg.solve(x[:split].T @ x[:split] + lam * split * np.eye(x.shape[1]), x[:split].T @ targets)
    pred = classes[(x[split:] @ w).argmax(1)]
    return float((pred == y[split:]).mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a pixellm train checkpoint or model directory")
    ap.add_argument("--scenes", type=int, default=60, help="held-out scenes (multi-target questions each)")
    ap.add_argument("--size", type=int, default=80, help="scene side in pixels (one size: one compile per length)")
    ap.add_argument("--out", help="write the JSON line here instead of stdout")
    args = ap.parse_args(argv)

    predictor = Predictor.from_checkpoint(args.checkpoint)
    cfg = predictor.loaded.config
    src = SyntheticShapes(num_samples=args.scenes, seed=PROBE_SEED, min_size=args.size, max_size=args.size,
                          min_shapes=3, max_targets=cfg.model.head.max_targets)
    rng = np.random.default_rng(0)
    same_cos, other_cos, own, union_iou, between, best_is_own = [], [], [], [], [], []
    by_size = {"small": [], "large": []}
    first_prompts = []
    feats: dict[str, list] = {}
    colours, kinds = [], []
    for index in range(args.scenes):
        scene = src.scene(index)
        question, answer, targets = None, None, []
        for kind in ("multi", "class", "size", "relation"):
            question, answer, targets = src.question(scene, kind, rng)
            if len(targets) >= 2:
                break
        q = question.removeprefix(IMAGE_PLACEHOLDER + "\n")
        out = predictor.intermediates(scene.image, q, answer)
        n = int(out.num_targets[0])
        if n != len(targets):
            raise SystemExit(f"scene {index}: {n} codebook groups for {len(targets)} targets in {answer!r}")
        prompts = out.seg_embeddings[0, :n].reshape(n, -1)
        masks = out.masks[0, :n] > 0
        everything = scene.visible.any(0)
        for a, b in combinations(range(n), 2):
            same_cos.append(cosine(prompts[a], prompts[b]))
            between.append(iou(masks[a], masks[b]))
        if first_prompts:
            other_cos.append(cosine(prompts[0], first_prompts[-1]))
        first_prompts.append(prompts[0])
        for m, t in zip(masks, targets):
            gt = scene.visible[t]
            own.append(iou(m, gt))
            union_iou.append(iou(everything, gt))
            by_size[scene.shapes[t].size].append(own[-1])
            best_is_own.append(int(np.argmax([iou(m, v) for v in scene.visible])) == t)
        grid = int(np.sqrt(out.vision_features[0].shape[1]))
        c, k = patch_labels(scene, grid)
        colours.append(c)
        kinds.append(k)
        for name, f in (("clip_deep", out.vision_features[0][0]), ("clip_shallow", out.vision_features[1][0]),
                        ("neck_deep", out.decoder_features[0][0].reshape(grid * grid, -1))):
            feats.setdefault(name, []).append(np.asarray(f, np.float64))
    colours, kinds = np.concatenate(colours), np.concatenate(kinds)
    split = len(colours) // 2
    majority = {"colour": float((colours[split:] == np.bincount(colours[:split]).argmax()).mean()),
                "kind": float((kinds[split:] == np.bincount(kinds[:split]).argmax()).mean())}
    probes = {name: {"colour": ridge_accuracy(np.concatenate(f), colours, split),
                     "kind": ridge_accuracy(np.concatenate(f), kinds, split)} for name, f in feats.items()}
    result = {
        "checkpoint": args.checkpoint, "scenes": args.scenes, "targets": len(own),
        "prompt_cosine_same_answer": float(np.mean(same_cos)), "prompt_cosine_other_image": float(np.mean(other_cos)),
        "mask_iou_own_target": float(np.mean(own)), "mask_iou_mark_everything": float(np.mean(union_iou)),
        "mask_iou_between_targets": float(np.mean(between)), "best_match_is_own_target": float(np.mean(best_is_own)),
        "mask_iou_small": float(np.mean(by_size["small"])) if by_size["small"] else None,
        "mask_iou_large": float(np.mean(by_size["large"])) if by_size["large"] else None,
        "linear_probe": probes, "linear_probe_majority": majority, "image_size": cfg.model.vision.image_size,
    }
    for key, value in result.items():
        if key not in ("linear_probe", "linear_probe_majority"):
            print(f"{key:32s} {value if not isinstance(value, float) else round(value, 3)}")
    for name, acc in probes.items():
        print(f"linear probe {name:19s} colour {acc['colour']:.3f} kind {acc['kind']:.3f}"
              f" (majority {majority['colour']:.3f} / {majority['kind']:.3f})")
    line = json.dumps(result)
    if args.out:
        Path(args.out).write_text(line + "\n")
    else:
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
