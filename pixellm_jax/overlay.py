"""Mask overlays a person can read: each target tinted in its own palette colour and numbered at its
centre, a legend of numbers and colours, ground truth outlined (`pixellm predict`, `serve`, `chat` and
the overlays a training run writes)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PALETTE = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180),
    (245, 130, 48), (70, 240, 240), (240, 50, 230), (128, 128, 0), (0, 128, 128),
)


def overlay(image: np.ndarray, masks: np.ndarray) -> Image.Image:
    """The image with each mask tinted in its palette colour, numbered, and a legend; same size."""
    canvas = image.astype(np.float32)
    for k, mask in enumerate(masks):
        colour = np.asarray(PALETTE[k % len(PALETTE)], np.float32)
        canvas[mask] = 0.5 * canvas[mask] + 0.5 * colour
    out = Image.fromarray(canvas.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for k, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        if len(xs):
            # the mask pixel nearest the mask's centroid, so the number sits on the target
            i = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
            draw.text((int(xs[i]), int(ys[i])), str(k + 1), fill=(255, 255, 255), font=font, anchor="mm",
                      stroke_width=1, stroke_fill=(0, 0, 0))
    if len(masks):
        line = 12
        draw.rectangle((0, 0, 34, 4 + line * len(masks)), fill=(0, 0, 0))
        for k in range(len(masks)):
            y = 2 + line * k
            draw.rectangle((2, y + 1, 11, y + 10), fill=PALETTE[k % len(PALETTE)])
            draw.text((15, y), str(k + 1), fill=(255, 255, 255), font=font)
    return out


def outline(mask: np.ndarray) -> np.ndarray:
    """The pixels of `mask` with a 4-neighbour outside it (or on the image border)."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def outlined(picture: Image.Image, truths: np.ndarray, colours: Sequence[int] | None = None) -> Image.Image:
    """`picture` with each ground-truth mask's outline drawn in a palette colour: its target's (k), or
    `colours[k]` when a ground truth is scored against another prediction than its own index."""
    canvas = np.array(picture)
    for k, truth in enumerate(truths):
        c = k if colours is None else colours[k]
        canvas[outline(truth)] = PALETTE[c % len(PALETTE)]
    return Image.fromarray(canvas)
