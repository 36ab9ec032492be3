"""Batched answer generation with a KV cache, and the masks of the codebook tokens it produced.

Reference §2.6: the official `evaluate` calls HF `generate` without a cache, so every step re-runs the
whole sequence (CLIP included), and reads the codebook states from the last step's hidden states with
the p−1 rule. Here one jitted program per shape does it all:

1. prefill: the prompt rows [Q, T] (right-padded, one image sentinel each) get their image tokens
   spliced in and run through the LLM once, filling a cache of T + n_img − 1 + max_new_tokens slots;
2. decode: a `lax.while_loop` feeds one token per step at each row's own next position (so padding
   never shifts RoPE positions: row i continues at its unpadded length), until every row has produced
   `eos_id` or `max_new_tokens` tokens; finished rows emit `pad_id`;
3. masks: the final post-norm hidden state of the step that *produced* each generated token is kept,
   which is exactly the state the p−1 rule selects for a codebook token, so the generated tokens with
   those states go through the model's own `decode_masks` (grouping by N·L in order, a count that is
   not a multiple of N·L gives that row no masks, `SegGather.malformed`), one decoder call per batch.

Only generated tokens are searched for codebook tokens (the official code would also pick up codebook
tokens written in the prompt, which its prompts never contain). Sampling is greedy when
`temperature == 0`, else temperature + nucleus (top-p) sampling from a PRNG key folded with the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pixellm_jax.models.codebook import SegGather
from pixellm_jax.models.grouped_take import take_in_groups
from pixellm_jax.models.multimodal import splice_image_tokens
from pixellm_jax.models.pixellm import ImageFeatures, PixelLM


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen; hashable, so it can be a static jit argument."""

    max_new_tokens: int = 512  # official evaluation: 512
    temperature: float = 0.0  # 0: greedy (official)
    top_p: float = 1.0  # nucleus mass kept when sampling

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")


class Generation(NamedTuple):
    tokens: jax.Array  # [Q, max_new] int32; pad_id after each row's eos
    lengths: jax.Array  # [Q] int32: generated tokens up to and including eos
    hidden: jax.Array  # [Q, max_new, D] post-norm state of the step that produced each token (0 after eos)


class GenerateOutput(NamedTuple):
    tokens: jax.Array  # [Q, max_new] int32
    lengths: jax.Array  # [Q] int32
    mask_logits: jax.Array  # [Q, M, h_out, w_out] decoder logits, one per generated target
    seg: SegGather  # targets per row (valid, num_targets, malformed, overflow)


def greedy_tokens(logits: jax.Array) -> jax.Array:
    """`argmax(logits, -1)` as int32, ties and NaNs included (the first maximum, else the first NaN).

    XLA:CPU's argmax is a (value, index) reduction it does not vectorise: over [8, 32k] logits it
    costs as much as a third of the vocabulary projection. A max, then the smallest index holding it
    (as float32, exact below 2^24), are two plain reductions and give the same index.
    """
    v = logits.shape[-1]
    if v >= 1 << 24:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    top = jnp.max(logits, axis=-1, keepdims=True)  # NaN if the row has one (max propagates NaNs)
    hit = (logits == top) | jnp.isnan(logits)
    index = jnp.where(hit, jnp.arange(v, dtype=jnp.float32), jnp.inf)
    return jnp.min(index, axis=-1).astype(jnp.int32)


@jax.named_scope("sampling")
def select_tokens(logits: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Next token per row from logits [Q, V]: argmax, or a temperature / top-p sample."""
    if sampling.temperature == 0.0:
        return greedy_tokens(logits)
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        kept = jnp.where(before < sampling.top_p, ordered, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)  # the least likely kept logit
        logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def prompt_lengths(attention_mask: jax.Array, n_image_tokens: int) -> jax.Array:
    """Unpadded length [Q] of each right-padded prompt after the image splice (one sentinel per row)."""
    return attention_mask.sum(axis=1, dtype=jnp.int32) + (n_image_tokens - 1)


def generate_tokens(
    model: PixelLM,
    images: ImageFeatures,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    conv_image: jax.Array,
    *,
    eos_id: int,
    pad_id: int,
    sampling: SamplingConfig,
    key: jax.Array | None = None,
    image_groups: int = 1,
) -> Generation:
    """Generate up to `sampling.max_new_tokens` tokens per prompt row with the LLM's KV cache.

    input_ids / attention_mask [Q, T]: right-padded prompts with one image sentinel each; conv_image
    [Q]: the image row of `images` each prompt is about (within blocks: `image_groups`, see
    `grouped_take`). `key` is needed only when sampling.
    """
    llm = model.llm
    q, t = input_ids.shape
    n_img = images.llm_tokens.shape[1]
    max_new = sampling.max_new_tokens
    if key is None:
        key = jax.random.key(0)
    spliced = splice_image_tokens(
        llm.embed(jnp.maximum(input_ids, 0)), input_ids, attention_mask,
        take_in_groups(images.llm_tokens, conv_image, image_groups),
        take_in_groups(images.llm_mask, conv_image, image_groups),
    )
    # One cache buffer and one set of weights per layer, sliced once here and used by the prefill and
    # every decode step: no layer scan slicing weights and caches (and restacking the cache) per token,
    # each step writes its cache slot in place (see models/llama.py).
    layers = llm.unstacked_layers()
    cache = llm.init_cache(q, t + n_img - 1 + max_new, unstacked=True)
    prefill = llm(input_embeds=spliced.embeds, attention_mask=spliced.attention_mask, cache=cache, layers=layers,
                  prefill=True)  # the prompt attends within itself, not over the max_new empty slots
    lengths = prompt_lengths(attention_mask, n_img)
    rows = jnp.arange(q)
    # Only the last real position's logits are needed; the full-sequence logits are dead code under jit.
    h0 = prefill.hidden[rows, lengths - 1]
    tok0 = select_tokens(llm.lm_head(h0), jax.random.fold_in(key, 0), sampling)

    tokens = jnp.full((q, max_new), pad_id, jnp.int32).at[:, 0].set(tok0)
    hidden = jnp.zeros((q, max_new, h0.shape[-1]), h0.dtype).at[:, 0].set(h0)
    # The LLM's state rides in the loop carry (unchanged; XLA aliases it, nothing is copied) and the
    # body merges modules whose values belong to the body's trace.
    graphdef, state = nnx.split((llm, layers))

    def cond(carry):
        step, _, _, _, done, _ = carry
        return (step < max_new) & ~jnp.all(done)

    def body(carry):
        step, cache, tokens, hidden, done, state = carry
        step_llm, step_layers = nnx.merge(graphdef, state)
        prev = jax.lax.dynamic_index_in_dim(tokens, step - 1, axis=1, keepdims=True)
        out = step_llm(prev, jnp.ones((q, 1), bool), (lengths + step - 1)[:, None], cache, layers=step_layers)
        h = out.hidden[:, 0]
        tok = select_tokens(out.logits[:, 0], jax.random.fold_in(key, step), sampling)
        tok = jnp.where(done, pad_id, tok)
        h = jnp.where(done[:, None], jnp.zeros((), h.dtype), h)
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, tok, step, axis=1)
        hidden = jax.lax.dynamic_update_index_in_dim(hidden, h, step, axis=1)
        return step + 1, out.cache, tokens, hidden, done | (tok == eos_id), state

    carry = (jnp.ones((), jnp.int32), prefill.cache, tokens, hidden, tok0 == eos_id, state)
    _, _, tokens, hidden, _, _ = jax.lax.while_loop(cond, body, carry)
    is_eos = tokens == eos_id
    out_lengths = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, max_new).astype(jnp.int32)
    return Generation(tokens, out_lengths, hidden)


def generated_masks(
    model: PixelLM, images: ImageFeatures, generation: Generation, conv_image: jax.Array, pad_id: int,
    image_groups: int = 1,
) -> tuple[jax.Array, SegGather]:
    """Mask logits [Q, M, h, w] of the codebook groups in the generated tokens, one decoder call.

    The generated tokens are laid out after one placeholder position, with the hidden state that
    produced token s at position s, so the p−1 rule of `decode_masks` picks exactly those states.
    """
    q = generation.tokens.shape[0]
    ids = jnp.concatenate([jnp.full((q, 1), pad_id, jnp.int32), generation.tokens], axis=1)
    hidden = jnp.concatenate([generation.hidden, jnp.zeros_like(generation.hidden[:, :1])], axis=1)
    return model.decode_masks(images, hidden, ids, conv_image, image_groups)


def generate(
    model: PixelLM,
    pixels: jax.Array,
    resized_hw: jax.Array,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    conv_image: jax.Array,
    *,
    eos_id: int,
    pad_id: int,
    sampling: SamplingConfig = SamplingConfig(),
    key: jax.Array | None = None,
    image_groups: int = 1,
) -> GenerateOutput:
    """Answers and their masks for prompt rows about images [B, S, S, 3] (see `generate_tokens`)."""
    images = model.encode_images(pixels, resized_hw)
    gen = generate_tokens(model, images, input_ids, attention_mask, conv_image, eos_id=eos_id, pad_id=pad_id,
                          sampling=sampling, key=key, image_groups=image_groups)
    masks, seg = generated_masks(model, images, gen, conv_image, pad_id, image_groups)
    return GenerateOutput(gen.tokens, gen.lengths, masks, seg)
