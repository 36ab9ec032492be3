"""Prediction on image files: the answer with its targets numbered, a colour overlay, one PNG per mask.

For each image the question is asked in the official chat format ("<image>\\n{question}", reference
§9; after the finished turns of a `history`, see `chat_prompt`), the answer generated in batches with
the KV-cache generator, and written as
  <stem>_overlay.png   the image with target k tinted in colour k (50 %), its number at the mask,
                       and a legend of numbers and colours in the top-left corner;
  <stem>_mask_<k>.png  target k as a 0/255 greyscale mask;
all at the input image's size. An image that cannot be read is left out and reported (`on_skip`);
the others are still predicted. Images may be files or in memory (PIL images, uint8 arrays): the
`Predictor` API (pixellm_jax/predictor.py) calls the same `predict`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence, Union

import numpy as np
from PIL import Image

from pixellm_jax.data.conversation import LegacyTokenizer, tokenize_generation
from pixellm_jax.data.dataset_io import image_to_rgb, load_image
from pixellm_jax.data.sample import IMAGE_PLACEHOLDER, BadSample
from pixellm_jax.errors import UserError, writing
from pixellm_jax.eval.answer_text import numbered_answer, raw_answer
from pixellm_jax.eval.batches import BatchShape, EvalItem, pack
from pixellm_jax.eval.generate import SamplingConfig
from pixellm_jax.overlay import overlay
from pixellm_jax.eval.runner import BatchRunner, sampling_key

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class NothingPredicted(UserError):
    """No image could be predicted (none found, or none readable): `pixellm predict` exits 1."""

    exit_code = 1


class Prediction(NamedTuple):
    image_path: Path
    image: np.ndarray  # [H, W, 3] uint8
    answer: str  # with "[k]" markers
    masks: np.ndarray  # [k, H, W] bool
    raw_answer: str = ""  # as generated, codebook tokens included (what a next turn's history feeds back)


class BadQuestion(UserError, ValueError):
    """A question or history turn that writes "<image>" itself (the prompt places the image)."""


def chat_prompt(
    tok: LegacyTokenizer, question: str, history: Sequence[tuple[str, str]] = (), use_im_start_end: bool = True
) -> np.ndarray:
    """Generation prompt ids for `question` after the finished (question, answer) turns of `history` about
    the same image (llava_v1, multi-turn): "<image>\\n" goes before the first question only, the
    history's first when there is one; answers are fed back as generated (`Prediction.raw_answer`)."""
    texts = [question, *(t for turn in history for t in turn)]
    if any(IMAGE_PLACEHOLDER in t for t in texts):
        raise BadQuestion(f"questions and answers must not contain {IMAGE_PLACEHOLDER}: the prompt places the image")
    turns = [(str(q), str(a)) for q, a in history]
    if turns:
        turns[0] = (f"{IMAGE_PLACEHOLDER}\n{turns[0][0]}", turns[0][1])
    else:
        question = f"{IMAGE_PLACEHOLDER}\n{question}"
    return tokenize_generation(tok, question, turns, use_im_start_end=use_im_start_end)


def image_files(path: str | Path) -> list[Path]:
    """The image itself, or the images of a folder (sorted)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise NothingPredicted(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)})")
        return files
    if not path.is_file():
        raise NothingPredicted(f"{path}: no such image or folder")
    return [path]


ImageInput = Union[str, Path, np.ndarray, Image.Image]


def read_image(image: ImageInput, index: int = 0) -> tuple[Path, np.ndarray]:
    """(name, [H, W, 3] uint8 RGB) of an image file, a PIL image or an array; BadSample if unusable.

    In-memory images are named `image_<index>`; an array must be [H, W, 3] (or [H, W]) uint8.
    """
    if isinstance(image, (str, Path)):
        return Path(image), load_image(image, str(image))
    name = Path(f"image_{index}")
    if isinstance(image, Image.Image):
        return name, image_to_rgb(image)
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) < 1:
        raise BadSample(str(name), f"expected an [H, W, 3] uint8 RGB array, got {array.dtype} {array.shape}")
    return name, array


def predict(
    runner: BatchRunner,
    tok: LegacyTokenizer,
    decode: Callable[[list[int]], str],
    sources: Sequence[ImageInput],
    question: str,
    shape: BatchShape,
    sampling: SamplingConfig,
    seed: int = 0,
    on_skip: Callable[[Path, str], None] = lambda path, reason: None,
    history: Sequence[tuple[str, str]] = (),
) -> Iterator[Prediction]:
    """Answers and masks for each image (file, PIL image or array), batched; an unusable image is
    passed to `on_skip` with the reason and left out. `history`: earlier (question, answer) turns about
    each image, answers as generated (`chat_prompt`); only this answer's codebook tokens give masks."""
    head = runner.cfg.head
    prompt = chat_prompt(tok, question, history, shape.use_im_start_end)

    images: dict[int, np.ndarray] = {}
    paths: dict[int, Path] = {}

    def stream():
        for i, source in enumerate(sources):
            try:
                paths[i], images[i] = read_image(source, i)
            except BadSample as e:
                on_skip(Path(source) if isinstance(source, (str, Path)) else Path(f"image_{i}"), e.reason)
                continue
            path = paths[i]
            empty = np.zeros((0, *images[i].shape[:2]), bool)
            yield images[i], [EvalItem(i, 0, str(path), question, "", empty, prompt)]

    for step, batch in enumerate(pack(stream(), shape, tok.pad_id)):
        out = runner.generate(batch, sampling, tok.eos_id, tok.pad_id, sampling_key(seed, step))
        for j, item in batch.placed():
            tokens = out["tokens"][j, : out["lengths"][j]]
            answer, _ = numbered_answer(decode, tokens, head.seg_ids(runner.cfg.text.vocab_size),
                                        head.num_seg_tokens, tok.eos_id)
            n = int(min(out["num_targets"][j], head.max_targets))
            h, w = item.gt.shape[1:]
            image = images.pop(item.sample_index)
            yield Prediction(paths.pop(item.sample_index), image, answer, out["mask_logits"][j, :n, :h, :w] > 0,
                             raw_answer(decode, tokens, tok.eos_id))


def write_prediction(prediction: Prediction, out_dir: str | Path) -> list[Path]:
    """Write the overlay and the per-target masks; returns the files written (OutputError if it cannot)."""
    out_dir = Path(out_dir)
    stem = prediction.image_path.stem
    files = [out_dir / f"{stem}_overlay.png"]
    with writing(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        overlay(prediction.image, prediction.masks).save(files[0])
        for k, mask in enumerate(prediction.masks):
            files.append(out_dir / f"{stem}_mask_{k + 1}.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(files[-1])
    return files
