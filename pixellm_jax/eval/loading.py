"""Loading a model for evaluation and prediction: the one function the commands call.

A checkpoint directory is what `convert.checkpoint.load_pretrained` opens (params/, config.yaml,
tokenizer/). It is loaded with LoRA dropout off (inference never uses it, so the model holds no RNG
state), and the tokenizer's codebook ids must be the model's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from pixellm_jax.config import Config
from pixellm_jax.data.conversation import LegacyTokenizer
from pixellm_jax.models.pixellm import PixelLM


class Loaded(NamedTuple):
    model: PixelLM
    config: Config
    tokenizer: Any  # transformers tokenizer (decoding)
    legacy: LegacyTokenizer  # the 4.31-compatible encoder (prompts)


def inference_config(cfg: Config) -> Config:
    """`cfg` with LoRA dropout off."""
    lora = dataclasses.replace(cfg.model.lora, dropout=0.0)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora=lora))


def legacy_tokenizer(tokenizer: Any, cfg: Config) -> LegacyTokenizer:
    """The prompt encoder of a transformers tokenizer, checked against the model's codebook ids."""
    head = cfg.model.head
    legacy = LegacyTokenizer.from_transformers(tokenizer, head.seg_token_num, head.scale_num)
    expected = list(head.seg_ids(cfg.model.text.vocab_size))
    if legacy.seg_ids != expected:
        raise ValueError(f"tokenizer codebook ids {legacy.seg_ids} differ from the model's {expected} "
                         "(model.head.seg_token_ids / model.text.vocab_size)")
    return legacy


def decoder(loaded: Loaded):
    """Token ids -> text, special tokens kept (the official chat output, `[k]` markers added later)."""
    return lambda ids: loaded.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def load_for_inference(checkpoint: str | Path, overrides: Sequence[str] = ()) -> Loaded:
    """Model, config and tokenizers from a checkpoint directory; `overrides` adjust its config."""
    from transformers import AutoTokenizer

    from pixellm_jax.convert.checkpoint import load_pretrained

    pretrained = load_pretrained(checkpoint, overrides=[*overrides, "model.lora.dropout=0.0"])
    tokenizer = AutoTokenizer.from_pretrained(pretrained.tokenizer_dir)
    return Loaded(pretrained.model, pretrained.config, tokenizer, legacy_tokenizer(tokenizer, pretrained.config))
