"""What PixelLM trains, what it freezes, and building a model with each part in its storage dtype.

Reference §4: LoRA factors, the whole `embed_tokens` and `lm_head`, both projectors, the mask decoder
and `text_hidden_fcs` are trained; CLIP and the LLaMA base weights are frozen. The official code
also leaves the prompt encoder and the neck frozen at their random initialisation (probably by
accident); `head.train_prompt_encoder_and_neck` trains them as the paper implies. Buffers (the random
Fourier matrices) are never trained.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pixellm_jax.config import ModelConfig
from pixellm_jax.models.lora import LoRAParam
from pixellm_jax.models.pixellm import DTYPES, PixelLM

_ALWAYS = (
    ("mm_projector",),
    ("out_mm_projector",),
    ("text_hidden_fcs",),
    ("token_fusion",),
    ("mask_decoder",),
    ("llm", "embed_tokens"),
    ("llm", "lm_head"),
)
_PAPER = (("prompt_encoder",), ("image_feature_neck",))


def trainable_filter(cfg: ModelConfig):
    """An nnx filter selecting the trainable parameters of a `PixelLM` built from `cfg`."""
    prefixes = _ALWAYS + (_PAPER if cfg.head.train_prompt_encoder_and_neck else ())

    def is_trainable(path: tuple, value) -> bool:
        if isinstance(value, LoRAParam):
            return True
        if not isinstance(value, nnx.Param):
            return False
        keys = tuple(str(k) for k in path)
        return any(keys[: len(p)] == p for p in prefixes)

    return is_trainable


def frozen_filter(cfg: ModelConfig):
    """Parameters (not buffers) that are not trained."""
    trainable = trainable_filter(cfg)
    return lambda path, value: isinstance(value, nnx.Param) and not trainable(path, value)


def cast_frozen(model: PixelLM, cfg: ModelConfig) -> None:
    """Store frozen parameters in `cfg.frozen_param_dtype`; trainable ones stay float32."""
    dtype = DTYPES[cfg.frozen_param_dtype]
    state = nnx.state(model, frozen_filter(cfg))
    nnx.update(model, jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state))


def build_pixellm(cfg: ModelConfig, seed: int = 0) -> PixelLM:
    """A freshly initialised PixelLM with frozen parts in their storage dtype.

    Wrap in `nnx.eval_shape` to get shapes without memory, or in a jit with output shardings to
    initialise directly into a sharded layout.
    """
    model = PixelLM(cfg, rngs=nnx.Rngs(seed))
    cast_frozen(model, cfg)
    return model
