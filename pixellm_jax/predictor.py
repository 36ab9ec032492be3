"""The inference API: a checkpoint directory -> answers with numbered targets and their masks.

    from pixellm_jax.predictor import Predictor

    predictor = Predictor.from_checkpoint("runs/demo/model")
    result = predictor.predict("photo.jpg", "Segment the red circle.")
    result.answer        # "It is [1] ." -- target k is marked "[k]"
    result.masks         # [k, H, W] bool, at the image's original size
    again = predictor.predict("photo.jpg", "And the square?",
                              history=[("Segment the red circle.", result.raw_answer)])
    stages = predictor.intermediates("photo.jpg", "Segment the red circle.", "It is [SEG] .")

`predict` / `predict_many` run exactly what `pixellm predict` runs (same batching, generation and
post-processing), so their answers and masks are the command's; `history` holds the earlier
(question, answer) turns about the image for a multi-turn conversation (`pixellm chat`), the first
question without "<image>" and each answer as generated (`Prediction.raw_answer`). `intermediates`
runs the teacher-forced forward on a question and a given answer (`[SEG]` marks each target) and
returns every stage's output (`pixellm_jax.intermediates.Intermediates`) as NumPy arrays, for parity
work and probes.
Images may be file paths, PIL images or [H, W, 3] uint8 arrays.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from pixellm_jax.data.conversation import tokenize_training
from pixellm_jax.data.sample import IMAGE_PLACEHOLDER, BadSample
from pixellm_jax.data.transforms import preprocess_image
from pixellm_jax.errors import UserError
from pixellm_jax.eval.batches import inference_shape
from pixellm_jax.eval.generate import SamplingConfig
from pixellm_jax.eval.loading import Loaded, decoder, load_for_inference
from pixellm_jax.eval.predict import ImageInput, Prediction, predict, read_image
from pixellm_jax.eval.runner import BatchRunner
from pixellm_jax.intermediates import Intermediates, forward_intermediates


class UnusableImage(UserError, ValueError):
    """An image given to the Predictor could not be read or has the wrong shape or dtype."""


def _named(path: Path, reason: str) -> str:
    return reason if str(path) in reason else f"{path}: {reason}"


class Predictor:
    """A loaded checkpoint that answers questions about images (see the module docstring)."""

    def __init__(self, loaded: Loaded, *, images_per_batch: int = 8, rows_per_batch: int = 8,
                 canvas_step: int = 128, sampling: SamplingConfig | None = None):
        self.loaded = loaded
        self.runner = BatchRunner(loaded.model)
        self.shape = inference_shape(loaded.config, self.runner.local_devices, images_per_batch, rows_per_batch,
                                     canvas_step)
        self.sampling = sampling or SamplingConfig()
        self._decode = decoder(loaded)
        self._forward = nnx.jit(forward_intermediates, static_argnames="out_hw")

    @classmethod
    def from_checkpoint(cls, directory: str | Path, overrides: Sequence[str] = (), **kwargs) -> "Predictor":
        """Load a `pixellm convert` / `pixellm train` model directory; `overrides` adjust its config
        (e.g. `model.dtype=float32`); keyword arguments as `Predictor(...)`."""
        return cls(load_for_inference(directory, overrides), **kwargs)

    def predict_many(self, images: Sequence[ImageInput], question: str, *, seed: int = 0,
                     history: Sequence[tuple[str, str]] = ()) -> list[Prediction]:
        """One prediction per image, in order; an unusable image raises UnusableImage naming it.
        `history`: earlier (question, answer) turns asked of every image (module docstring)."""
        skipped: list[tuple[Path, str]] = []
        out = list(predict(self.runner, self.loaded.legacy, self._decode, images, question, self.shape,
                           self.sampling, seed, on_skip=lambda path, reason: skipped.append((path, reason)),
                           history=history))
        if skipped:
            raise UnusableImage("; ".join(_named(path, reason) for path, reason in skipped))
        return out

    def predict(self, image: ImageInput, question: str, *, seed: int = 0,
                history: Sequence[tuple[str, str]] = ()) -> Prediction:
        """The generated answer (targets marked "[k]"; `raw_answer` as generated) and its masks [k, H, W]
        at the original size; after the earlier turns of `history` when given (module docstring)."""
        return self.predict_many([image], question, seed=seed, history=history)[0]

    def intermediates(self, image: ImageInput, question: str, answer: str) -> Intermediates:
        """Every stage of the teacher-forced forward on one image, `question` and `answer`, as NumPy.

        The conversation is tokenised as in training (llava_v1, "<image>\\n" before the question, each
        `[SEG]` of the answer expanded to the codebook group); `masks` are at the image's own size.
        """
        try:
            _, rgb = read_image(image)
        except BadSample as e:
            raise UnusableImage(_named(Path(e.sample_id), e.reason)) from None
        cfg = self.loaded.config
        prepared = preprocess_image(rgb, cfg.model.vision.image_size, cfg.data.normalization)
        conv = tokenize_training(self.loaded.legacy, [(f"{IMAGE_PLACEHOLDER}\n{question}", answer)],
                                 max_text_len=1 << 20, use_im_start_end=cfg.data.use_im_start_end)
        ids = conv.input_ids[None]
        out = self._forward(
            self.loaded.model, prepared.pixels[None], np.asarray([prepared.resized_hw], np.int32),
            np.asarray([prepared.original_hw], np.int32), ids, np.ones_like(ids, bool), np.zeros((1,), np.int32),
            out_hw=tuple(prepared.original_hw),
        )
        return jax.tree.map(np.asarray, out)
