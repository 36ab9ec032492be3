"""A small MUSE-release-layout dataset written where a test chooses, with planted bad records.

`write_muse_layout(root, ...)` writes `<root>/<name>.json` and images under `<root>/<images>/train2014/`
(the MUSE JSON names COCO train2014 files; the image root is `<root>/<images>`). Each image holds two or
three coloured rectangles; each record has two questions answered in the released `text_answers`
form with one `{seg}` per target and COCO polygon segmentations. `bad` plants, per reason, that many
records (or questions) that the pipeline must drop and count:
  bad_image          a record whose image file is missing
  bad_polygon        a record with a malformed polygon (5 numbers)
  seg_mismatch       a question whose text answer has one `{seg}` too many (its record stays usable)
  too_many_targets   a question with 4 targets (for max_targets 3; its record stays usable)
  path_escapes_root  a record whose file_name climbs out of the image root
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


def _rect(rng, size):
    w, h = rng.integers(size // 5, size // 2, 2)
    x, y = rng.integers(0, size - w), rng.integers(0, size - h)
    return int(x), int(y), int(x + w), int(y + h)


def _instance(name, box):
    x0, y0, x1, y1 = box
    return {"category_id": 1, "category_name": name, "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]}


def write_muse_layout(root: Path, name: str = "train", records: int = 12, seed: int = 0, size: int = 48,
                      bad: dict[str, int] | None = None, images: str = "pics") -> Path:
    """Write the dataset; returns the JSON path (images under `root / images`)."""
    bad = dict(bad or {})
    rng = np.random.default_rng(seed)
    image_dir = root / images / "train2014"
    image_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(records):
        file_name = f"{name}_{i:04d}.png"
        picture = np.full((size, size, 3), 128, np.uint8)
        colours = list(rng.permutation(list(COLOURS))[: 3 if i % 2 else 2])
        boxes = {c: _rect(rng, size) for c in colours}
        for c in colours:
            x0, y0, x1, y1 = boxes[c]
            picture[y0:y1, x0:x1] = COLOURS[c]
        instances = [_instance(f"{c} box", boxes[c]) for c in colours]
        questions = [f"Where is the {colours[0]} box?", f"Find every box that is {' or '.join(colours)}."]
        answers = [[instances[0]], instances]
        text_answers = [f"The {colours[0]} box is {{seg}}.", " and ".join(f"{c} {{seg}}" for c in colours) + "."]
        record = {"file_name": file_name, "height": size, "width": size, "ann_list": instances,
                  "questions": questions, "answers": answers, "text_answers": text_answers}
        if bad.get("seg_mismatch", 0) > 0:
            bad["seg_mismatch"] -= 1
            record["text_answers"][0] += " {seg}"
        elif bad.get("too_many_targets", 0) > 0:
            bad["too_many_targets"] -= 1
            record["answers"][1] = instances + [instances[0]] * (4 - len(instances))
            record["text_answers"][1] = " and ".join(["{seg}"] * 4) + "."
        elif bad.get("bad_image", 0) > 0:
            bad["bad_image"] -= 1
            record["file_name"] = f"missing_{i}.png"
        elif bad.get("bad_polygon", 0) > 0:
            bad["bad_polygon"] -= 1
            record["answers"][0] = [dict(instances[0], segmentation=[[1, 2, 3, 4, 5]])]
        elif bad.get("path_escapes_root", 0) > 0:
            bad["path_escapes_root"] -= 1
            record["file_name"] = f"../../{file_name}"
        Image.fromarray(picture).save(image_dir / file_name)
        out.append(record)
    if any(v > 0 for v in bad.values()):
        raise ValueError(f"too few records ({records}) to plant {bad}")
    path = root / f"{name}.json"
    path.write_text(json.dumps(out))
    return path
