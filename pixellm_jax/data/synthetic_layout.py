"""The synthetic shapes dataset written to disk in MUSE's released layout, for training and evaluation
through the same loaders a user's data go through (`pixellm prepare-data --source synthetic --layout muse`).

Written under `out/`:
  images/train2014/synthetic_<split>_<index>.png   the scenes (MUSE's `file_name` images live in train2014/)
  muse_<split>.json    multi-target reasoning questions (multi, relation, class, size, count), each
                       answered in the released `text_answers` form with one "{seg}" per target
  refer_<split>.json   referring questions (one target each), same layout
Each record's `ann_list` holds every shape (`category_name` its kind, `rephrased_name` its unambiguous
description, `segmentation` its visible pixels as COCO compressed RLE, exact to the pixel); `answers`
repeats the target instances of each question in answer order. Split k of the splits uses seed + k, so
held-out scenes are never training scenes. Read with `MuseSource(out/"muse_val.json", out/"images")`
or the spec `muse:json=out/muse_val.json,images=out/images`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from pixellm_jax.data.sample import SEG_PLACEHOLDER
from pixellm_jax.data.synthetic import MASK_REQUEST, REASONING_KINDS, Scene, SyntheticShapes

IMAGE_SUBDIR = "images/train2014"


@dataclass
class Written:
    out: str
    images: dict[str, int]  # split -> scenes
    questions: dict[str, dict[str, int]]  # split -> {"muse": n, "refer": n}


def rle(mask: np.ndarray) -> dict:
    """[H, W] bool as COCO compressed RLE with a str `counts` (as released JSON files hold it)."""
    code = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in code["size"]], "counts": code["counts"].decode("ascii")}


def _annotation(scene: Scene, i: int) -> dict:
    s = scene.shapes[i]
    mask = scene.visible[i]
    ys, xs = np.nonzero(mask)
    bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
    name = scene.names[i] or f"{s.size} {s.colour} {s.kind}"
    return {"id": i, "category_name": s.kind, "rephrased_name": name, "segmentation": rle(mask),
            "area": int(mask.sum()), "bbox": bbox}


def _record(file_name: str, scene: Scene, qas: list[tuple[str, str, list[int]]]) -> dict:
    ann = [_annotation(scene, i) for i in range(len(scene.shapes))]
    height, width = scene.image.shape[:2]
    return {
        "file_name": file_name, "height": int(height), "width": int(width), "ann_list": ann,
        "questions": [q.removesuffix(" " + MASK_REQUEST) for q, _, _ in qas],  # released questions are bare:
        # the loaders add the request themselves (templates.LONG_QUESTION_LIST)
        "answers": [[ann[i] for i in targets] for _, _, targets in qas],
        "text_answers": [a.replace(SEG_PLACEHOLDER, "{seg}") for _, a, _ in qas],
    }


def write_synthetic_muse(
    out: str | Path,
    splits: Sequence[str] = ("train", "val"),
    num_samples: int | Sequence[int] = 1000,
    seed: int = 0,
    reasoning_questions: int = 3,
    refer_questions: int = 2,
    max_targets: int = 3,
    min_size: int = 64,
    max_size: int = 96,
    overwrite: bool = False,
) -> Written:
    """Writes the splits (scenes of seed + k for split k; `num_samples` per split, or one count per split)
    into `out` in MUSE layout. Written beside, then renamed into place: an existing `out` is kept
    unless `overwrite`, and replaced only once the new one is complete."""
    out = Path(out)
    counts = [num_samples] * len(splits) if isinstance(num_samples, int) else list(num_samples)
    if not splits or len(counts) != len(splits) or min(counts) < 1:
        raise ValueError(f"need at least one split and a positive scene count per split, got {splits}, {num_samples}")
    if reasoning_questions < 1 or refer_questions < 1:
        raise ValueError(f"need at least one reasoning and one referring question per image, got "
                         f"{reasoning_questions} and {refer_questions}")
    if len(set(splits)) != len(splits):
        raise ValueError(f"splits repeat: {list(splits)}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    questions: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-", dir=out.parent) as tmp:
        staging = Path(tmp) / "data"
        (staging / IMAGE_SUBDIR).mkdir(parents=True)
        for k, (split, n) in enumerate(zip(splits, counts)):
            src = SyntheticShapes(num_samples=n, seed=seed + k, min_size=min_size, max_size=max_size,
                                  max_targets=max_targets)
            muse, refer = [], []
            for index in range(n):
                scene = src.scene(index)
                file_name = f"synthetic_{split}_{index:06d}.png"
                Image.fromarray(scene.image).save(staging / IMAGE_SUBDIR / file_name)
                rng = np.random.default_rng([seed + k, index, 1])
                kinds = rng.permutation(REASONING_KINDS)
                reasoning = [src.question(scene, str(kinds[j % len(kinds)]), rng) for j in range(reasoning_questions)]
                muse.append(_record(file_name, scene, reasoning))
                refer.append(_record(file_name, scene, [src.question(scene, "refer", rng)
                                                        for _ in range(refer_questions)]))
            for name, records in (("muse", muse), ("refer", refer)):
                (staging / f"{name}_{split}.json").write_text(json.dumps(records))
            questions[split] = {"muse": sum(len(r["questions"]) for r in muse),
                                "refer": sum(len(r["questions"]) for r in refer)}
        if out.exists():  # replaced only now that the new one is complete; removed with tmp
            os.replace(out, Path(tmp) / "replaced")
        os.replace(staging, out)
    return Written(str(out), dict(zip(splits, counts)), questions)


def prepare_synthetic_command(args) -> int:
    """`pixellm prepare-data --source synthetic --layout muse` (arguments in cli.py)."""
    splits = args.split or ["train", "val"]
    try:
        counts = args.num_samples * len(splits) if len(args.num_samples) == 1 else args.num_samples
        written = write_synthetic_muse(args.out, splits, counts, args.seed, args.reasoning_questions,
                                       args.refer_questions, overwrite=args.overwrite)
    except (FileExistsError, ValueError) as e:
        print(f"pixellm prepare-data: error: {e}", file=sys.stderr)
        return 2
    for split, n in written.questions.items():
        print(f"synthetic split {split}: {written.images[split]} images, {n['muse']} reasoning questions "
              f"(muse_{split}.json), {n['refer']} referring questions (refer_{split}.json)")
    print(f"written to {written.out}; train on the spec muse:json={written.out}/muse_{splits[0]}.json,"
          f"images={written.out}/images")
    return 0
