"""A tiny PixelLM with the tiny tokenizer for the evaluation tests, built without eager initialisation.

`chain_answers` rewires the LM head so greedy decoding follows a fixed token chain (e.g. "ASSISTANT:"
-> "Sure" -> [SEG0] ... [SEG5] -> "." -> </s>), while attention still mixes in the context; so the
answers are known, well-formed and end at different steps, and the hidden states feeding the masks
still depend on the whole sequence.
"""

from __future__ import annotations

import numpy as np
from flax import nnx
from transformers import AutoTokenizer

from pixellm_jax.config import load_config
from pixellm_jax.convert.checkpoint import model_params, staged_output, write_checkpoint
from pixellm_jax.eval.loading import inference_config
from pixellm_jax.models.trainable import build_pixellm
from pixellm_jax.tokens import add_codebook_tokens
from tests.tiny_tokenizer import build_tiny_tokenizer


def tiny_tokenizer(directory):
    hf = AutoTokenizer.from_pretrained(build_tiny_tokenizer(directory))
    seg = add_codebook_tokens(hf, 3, 2)
    hf.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)
    return hf, seg


def tiny_config(hf, seg):
    """The tiny config with the tokenizer's vocabulary (a one-layer decoder transformer: faster to compile)."""
    overrides = [f"model.text.vocab_size={len(hf)}", f"model.head.seg_token_ids={seg}", "model.head.decoder_depth=1"]
    return inference_config(load_config("tiny", overrides))


def random_model(cfg, seed=0):
    """The tiny PixelLM with every variable drawn at random (norm scales 1 ± 0.05, kernels ~ 1/sqrt(fan_in))."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_pixellm(cfg.model)))
    rng = np.random.default_rng(seed)
    flat = []
    for path, var in nnx.to_flat_state(abstract):
        shape, dtype = var.get_value().shape, var.get_value().dtype
        name = str(path[-1])
        if name in ("scale", "weight"):
            value = 1 + 0.05 * rng.normal(size=shape)
        elif name in ("bias", "lora_b"):
            value = 0.05 * rng.normal(size=shape)
        elif name in ("kernel", "lora_a") and len(shape) >= 2:
            value = rng.normal(size=shape) / np.sqrt(shape[-2])
        else:  # embeddings, positional tables, Fourier matrices
            value = rng.normal(size=shape) * (1.0 if "gaussian" in name else 0.5)
        flat.append((path, var.replace(np.asarray(value, dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def chain_answers(model, chain: dict[int, int], strength: float = 3.0, damp: float = 0.1) -> None:
    """Make token `t` predict `chain[t]` (greedy), keeping the context's influence small but present."""
    llm = model.llm
    for proj in (llm.layers.self_attn.o_proj, llm.layers.mlp.down_proj):
        proj.kernel.set_value(proj.kernel[...] * damp)
    emb = np.asarray(llm.embed_tokens.embedding[...], np.float64)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    kernel = np.asarray(llm.lm_head.kernel[...], np.float64) * 0.1
    for src, dst in chain.items():
        kernel[:, dst] += strength * unit[src]
    llm.lm_head.kernel.set_value(kernel.astype(np.float32))


def save_checkpoint(model, cfg, hf, directory) -> None:
    """A checkpoint directory as `pixellm convert` writes it (what `load_for_inference` opens)."""
    params = {k: np.asarray(v) for k, v in model_params(model).items()}
    with staged_output(directory) as stage:
        write_checkpoint(stage, params, cfg, report={}, write_tokenizer=hf.save_pretrained)



def sure_seg_checkpoint(directory, seed: int = 3):
    """A tiny checkpoint at `directory/ckpt` whose greedy answer to any question is "Sure, [SEG]."
    (the six codebook tokens of one target) then </s>; returns (model, cfg, hf, legacy, answer ids)."""
    from pixellm_jax.data.conversation import tokenize_generation
    from pixellm_jax.eval.loading import legacy_tokenizer

    hf, seg = tiny_tokenizer(directory / "tok")
    cfg = tiny_config(hf, seg)
    legacy = legacy_tokenizer(hf, cfg)
    model = random_model(cfg, seed=seed)
    answer = legacy.encode_chunk("Sure, [SEG].")
    colon = int(tokenize_generation(legacy, "<image>\nx")[-1])
    chain_answers(model, dict(zip([colon, *answer], [*answer, legacy.eos_id])))
    save_checkpoint(model, cfg, hf, directory / "ckpt")
    return model, cfg, hf, legacy, answer
