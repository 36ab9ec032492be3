"""Segmentation codebook: its vocabulary rows and gathering the states of its `[SEG*]` tokens.

The codebook has N tokens per level and L levels (reference §1.5). In the answer text every target
is written as N·L consecutive codebook tokens; the hidden state that *predicts* each of them (the
state at position p−1 for a token at p) becomes that token's embedding (reference §2.5, §10.7).
Within a target the first N states form the level-0 (deep) prompt, the next N level 1, and so on;
grouping is purely by order of occurrence, token identity is never checked (as in the official code).
The token strings and their ids in a tokenizer live in `pixellm_jax/tokens.py`.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp


def resize_vocab_rows(
    embedding: jax.Array, lm_head_kernel: jax.Array, new_vocab: int, key: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Grow `embedding` [V, H] and `lm_head_kernel` [H, V] to `new_vocab`, appending N(0, 0.02) rows.

    Old rows are kept; new ones follow transformers 4.31 `resize_token_embeddings` (the official
    code's version), separately drawn for the input and output matrices.
    """
    vocab, hidden = embedding.shape
    if lm_head_kernel.shape != (hidden, vocab):
        raise ValueError(f"lm_head kernel {lm_head_kernel.shape} does not match embedding {embedding.shape}")
    if new_vocab < vocab:
        raise ValueError(f"new_vocab={new_vocab} is smaller than the current vocabulary {vocab}")
    extra = new_vocab - vocab
    k_emb, k_head = jax.random.split(key)
    new_emb = 0.02 * jax.random.normal(k_emb, (extra, hidden), jnp.float32)
    new_head = 0.02 * jax.random.normal(k_head, (hidden, extra), jnp.float32)
    return (
        jnp.concatenate([embedding, new_emb.astype(embedding.dtype)], axis=0),
        jnp.concatenate([lm_head_kernel, new_head.astype(lm_head_kernel.dtype)], axis=1),
    )


class SegGather(NamedTuple):
    """Codebook states grouped per target; every row of the batch is one question."""

    states: jax.Array  # [B, max_targets, L, N, D]; zeros where not valid
    valid: jax.Array  # [B, max_targets] bool
    num_targets: jax.Array  # [B] int32: complete targets in the row (0 when malformed), before capping
    malformed: jax.Array  # [B] bool: codebook-token count not a multiple of N·L -> the row has no targets
    overflow: jax.Array  # [B] bool: more than max_targets targets; the extra ones are not returned
    question_id: jax.Array  # [B, max_targets] int32: the row index (one question per row)


def gather_seg_states(
    hidden: jax.Array,
    token_ids: jax.Array,
    seg_ids: Sequence[int] | jax.Array,
    n: int,
    l: int,
    max_targets: int,
) -> SegGather:
    """Collect the states predicting the codebook tokens, grouped per target.

    hidden: [B, T, D] states aligned with token_ids [B, T] (the image-expanded sequence). A codebook
    token at position p contributes hidden[:, p−1]; one at p = 0 has no predicting state and is not
    counted. The k-th codebook token of a row goes to target k // (N·L), level (k // N) % L, slot k % N.
    A row whose count is not a multiple of N·L yields no targets (official inference rule, §2.6) and
    is flagged `malformed`. Jit-friendly: n, l, max_targets are static; no loop over the batch.
    """
    b, t, d = hidden.shape
    group = n * l
    slots = max_targets * group
    ids = jnp.asarray(seg_ids, dtype=token_ids.dtype).reshape(-1)
    is_seg = jnp.isin(token_ids, ids)
    # predicts[b, t] is True when the token at t + 1 is a codebook token.
    predicts = jnp.concatenate([is_seg[:, 1:], jnp.zeros((b, 1), bool)], axis=1)
    count = predicts.sum(axis=1, dtype=jnp.int32)
    order = jnp.cumsum(predicts, axis=1, dtype=jnp.int32) - 1
    slot = jnp.where(predicts & (order < slots), order, slots)
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    source = jnp.zeros((b, slots + 1), jnp.int32).at[rows, slot].set(pos)[:, :slots]

    malformed = count % group != 0
    num_targets = jnp.where(malformed, 0, count // group)
    valid = jnp.arange(max_targets)[None, :] < num_targets[:, None]
    states = jnp.take_along_axis(hidden, source[:, :, None], axis=1)
    states = states.reshape(b, max_targets, l, n, d)
    states = jnp.where(valid[:, :, None, None, None], states, jnp.zeros((), hidden.dtype))
    return SegGather(
        states=states,
        valid=valid,
        num_targets=num_targets,
        malformed=malformed,
        overflow=num_targets > max_targets,
        question_id=jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, max_targets)),
    )
