"""Greedy generation by full recomputation: the official approach, kept as the reference.

The official `evaluate` (reference §2.6) runs HF `generate` with `use_cache=False`: every new token
re-runs CLIP, the projectors and the LLM over the whole sequence, and the codebook states are read
from the last step's hidden states with the p−1 rule. This does the same for a batch with fixed
shapes, so it jits once: the rows live in a [Q, T + max_new] text buffer, each step runs the
full forward over the buffer (causal attention makes the right padding irrelevant) and appends the
argmax at each row's next position; the masks come from `decode_masks` over the final sequence.
It exists to check the KV-cache generator token for token and as the benchmark baseline.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixellm_jax.eval.generate import GenerateOutput
from pixellm_jax.eval.runner import StaticGraph
from pixellm_jax.models.pixellm import PixelLM


# jax.jit of (graph definition, state), split once per call of `generate_by_recomputation`: an
# `nnx.jit` step would walk the model's graph and copy every weight on each of the max_new calls.
@functools.partial(jax.jit, static_argnames="graphdef")
def _next_tokens(graphdef: StaticGraph, state, pixels, resized_hw, ids, mask, conv_image, last):
    """Argmax after position `last` [Q] of the spliced sequence, recomputing everything."""
    model: PixelLM = graphdef.merge(state)
    images = model.encode_images(pixels, resized_hw)
    _, out = model.language(images, ids, mask, conv_image)
    return jnp.argmax(out.logits[jnp.arange(ids.shape[0]), last], axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames="graphdef")
def _final_masks(graphdef: StaticGraph, state, pixels, resized_hw, ids, mask, conv_image):
    model: PixelLM = graphdef.merge(state)
    images = model.encode_images(pixels, resized_hw)
    spliced, out = model.language(images, ids, mask, conv_image)
    return model.decode_masks(images, out.hidden, spliced.token_ids, conv_image)


def generate_by_recomputation(
    model: PixelLM,
    pixels: np.ndarray,
    resized_hw: np.ndarray,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    conv_image: np.ndarray,
    *,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
) -> GenerateOutput:
    """Greedy answers and masks for right-padded prompt rows, one full forward per new token."""
    q, t = input_ids.shape
    n_img = model.cfg.projector.llm_grid ** 2
    text_len = np.asarray(attention_mask).sum(axis=1)
    ids = np.full((q, t + max_new_tokens), pad_id, np.int32)
    ids[:, :t] = np.where(attention_mask, input_ids, pad_id)
    mask = np.zeros(ids.shape, bool)
    mask[:, :t] = attention_mask
    tokens = np.full((q, max_new_tokens), pad_id, np.int32)
    done = np.zeros(q, bool)
    graphdef, state = nnx.split(model)
    graphdef = StaticGraph(graphdef)
    for step in range(max_new_tokens):
        last = text_len + step + n_img - 2  # spliced index of each row's last token
        nxt = np.asarray(_next_tokens(graphdef, state, pixels, resized_hw, jnp.asarray(ids), jnp.asarray(mask),
                                      conv_image, jnp.asarray(last)))
        nxt = np.where(done, pad_id, nxt)
        tokens[:, step] = nxt
        rows = np.flatnonzero(~done)
        ids[rows, text_len[rows] + step] = nxt[rows]
        mask[rows, text_len[rows] + step] = True
        done |= nxt == eos_id
        if done.all():
            break
    is_eos = tokens == eos_id
    lengths = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, max_new_tokens).astype(np.int32)
    masks, seg = _final_masks(graphdef, state, pixels, resized_hw, jnp.asarray(ids), jnp.asarray(mask), conv_image)
    return GenerateOutput(jnp.asarray(tokens), jnp.asarray(lengths), masks, seg)
