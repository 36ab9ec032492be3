"""Optional LLM-judge step: writes the prompts a judge model would score; never calls a network.

The paper scores MUSE answers with GPT-4 as well as by IoU; the official repository builds the
inputs (objects with their boxes, the answer with each generated target replaced by the matched
ground truth "(name [x0, y0, x1, y1])" or "(None [])") but its scoring script is not released
(reference §6). Here every generated answer becomes one JSON line {"id", "prompt"}, in the same
spirit, with ground-truth objects named "target k" and boxed from their masks. Send the file to any
judge and combine its scores with the IoU metrics offline.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

import numpy as np

_MARKER = re.compile(r"\[(\d+)\]")


def mask_box(mask: np.ndarray) -> list[int]:
    """[x0, y0, x1, y1] pixel box of a boolean mask (x1, y1 exclusive); [] when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return []
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def judge_prompt(record: dict, gt: np.ndarray) -> str:
    """The judge prompt of one generated-answer record (see `evaluate`) and its ground truths [k, H, W]."""
    boxes = [mask_box(m) for m in gt]
    name = {k: f"(target {k + 1} {boxes[k]})" for k in range(len(boxes))}
    matched = {p["pred"]: p["gt"] for p in record["pairs"] if p["pred"] is not None}

    def model_target(m: re.Match) -> str:
        gt_index = matched.get(int(m.group(1)) - 1)
        return name[gt_index] if gt_index is not None else "(None [])"

    reference = _MARKER.sub(lambda m: name.get(int(m.group(1)) - 1, "(None [])"), record["reference_answer"])
    answer = _MARKER.sub(model_target, record["answer"])
    objects = ", ".join(f"target {k + 1} at {b}" for k, b in enumerate(boxes)) or "none"
    h, w = gt.shape[1:] if gt.ndim == 3 else (0, 0)
    return (
        "You judge an answer to a question about an image. The objects the reference answer refers to, "
        f"with their bounding boxes [x0, y0, x1, y1], are: {objects}. The image height is {h}, width is {w}.\n"
        f"Question: {record['question']}\n"
        f"Reference answer: {reference}\n"
        "Answer to judge (each object it segmented is replaced by the reference object its mask matched, "
        f"or (None []) when it matched none): {answer}\n"
        "Rate the answer from 0 to 10 for correctness and completeness against the reference. "
        "Reply with the number only."
    )


def write_judge_prompts(path: str | Path, entries: Iterable[tuple[str, str]]) -> int:
    """Write (id, prompt) pairs as JSON lines; returns how many."""
    n = 0
    with open(path, "w") as f:
        for ident, prompt in entries:
            f.write(json.dumps({"id": ident, "prompt": prompt}) + "\n")
            n += 1
    return n
