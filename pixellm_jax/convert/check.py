"""`pixellm convert --check`: one prompt through the PyTorch source and the converted model.

The PyTorch side is transformers' `LlamaForCausalLM` holding the source checkpoint's language-model
tensors (read through the same table, renamed to `LlamaForCausalLM` keys; the official PixelLM class is
not installable, and LLaVA's language model is exactly this class). Both sides run in float32 on the
prompt's tokens; reported are the largest absolute logit difference and the mean KL divergence
KL(p_torch || p_jax) over positions, on the source's vocabulary rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pixellm_jax.config import TextConfig
from pixellm_jax.convert.checkpoint import load_pretrained
from pixellm_jax.convert.errors import ConversionError
from pixellm_jax.convert.readers import to_torch
from pixellm_jax.convert.tables import Table, llama_rules
from pixellm_jax.convert.validate import Source

DEFAULT_PROMPT = ("A chat between a curious human and an artificial intelligence assistant. USER: "
                  "What is in this image? ASSISTANT:")


@dataclass
class CheckResult:
    max_abs_diff: float
    kl: float
    tokens: int
    vocab: int

    def __str__(self) -> str:
        return (f"check: {self.tokens} tokens, logits over {self.vocab} vocabulary rows: "
                f"max |torch - jax| = {self.max_abs_diff:.3g}, mean KL(torch || jax) = {self.kl:.3g}")


def compare_logits(reference: np.ndarray, ours: np.ndarray) -> tuple[float, float]:
    """(max absolute difference, mean over positions of KL(softmax(reference) || softmax(ours)))."""
    ref, got = np.asarray(reference, np.float64), np.asarray(ours, np.float64)

    def log_softmax(x):
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    logp, logq = log_softmax(ref), log_softmax(got)
    kl = np.sum(np.exp(logp) * (logp - logq), axis=-1)
    return float(np.max(np.abs(ref - got))), float(np.mean(kl))


def torch_language_model(source: Source, text: TextConfig):
    """transformers `LlamaForCausalLM` (float32) holding the source's language-model tensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = Table("LlamaForCausalLM", tuple(llama_rules("model.", "")))
    state = {}
    for key, info in source.reader.infos.items():
        hit = source.table.rule_for_key(key)
        if hit is None or not hit[1].startswith("llm/"):
            continue
        rule, path, layer = hit
        hf_rule, values = hf.rule_for_target(path)
        state[hf_rule.source_key(values, layer)] = to_torch(source.reader.read(key).astype(np.float32))
    if "model.embed_tokens.weight" not in state:
        raise ConversionError(f"{source.reader.path}: no language-model tensors to check against")
    config = LlamaConfig(
        vocab_size=state["model.embed_tokens.weight"].shape[0], hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size, num_hidden_layers=text.num_layers,
        num_attention_heads=text.num_heads, num_key_value_heads=text.num_kv_heads, rms_norm_eps=text.rms_norm_eps,
        rope_theta=text.rope_theta, max_position_embeddings=text.max_position_embeddings,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    rotary = model.model.rotary_emb  # non-persistent buffers: rebuild them on the CPU
    model.model.rotary_emb = type(rotary)(config=config)
    return model.eval()


def check_conversion(checkpoint: str | Path, source: Source, prompt: str = DEFAULT_PROMPT) -> CheckResult:
    """Run `prompt` through the source (PyTorch) and the converted checkpoint; compare the logits."""
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from transformers import AutoTokenizer

    pre = load_pretrained(checkpoint, overrides=["model.dtype=float32", "model.lora.dropout=0.0"])
    ids = AutoTokenizer.from_pretrained(str(pre.tokenizer_dir))(prompt).input_ids
    reference = torch_language_model(source, pre.config.model.text)
    vocab = reference.config.vocab_size
    with torch.no_grad():
        ref = reference(torch.tensor([ids])).logits[0].numpy()
    logits = nnx.jit(lambda llm, x: llm(x).logits)(pre.model.llm, jnp.asarray([ids], jnp.int32))
    ours = np.asarray(logits)[0, :, :vocab]
    max_diff, kl = compare_logits(ref, ours)
    return CheckResult(max_diff, kl, len(ids), vocab)
