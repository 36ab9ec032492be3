"""Segmentation codebook: the `[SEG*]` tokens, their vocabulary rows, and gathering their states.

The codebook has N tokens per level and L levels (reference §1.5). In the answer text every target
is written as N·L consecutive codebook tokens; the hidden state that *predicts* each of them (the
state at position p−1 for a token at p) becomes that token's embedding (reference §2.5, §10.7).
Within a target the first N states form the level-0 (deep) prompt, the next N level 1, and so on;
grouping is purely by order of occurrence, token identity is never checked (as in the official code).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp


def seg_token_strings(n: int, l: int) -> list[str]:
    """`[SEG0]`..`[SEG{N·L−1}]`, or the single LISA-style `[SEG]` when N·L = 1."""
    if n < 1 or l < 1:
        raise ValueError(f"codebook needs n >= 1 and l >= 1, got n={n}, l={l}")
    if n * l == 1:
        return ["[SEG]"]
    return [f"[SEG{i}]" for i in range(n * l)]


def codebook_ids_from_tokenizer(tokenizer, n: int, l: int) -> list[int]:
    """Ids of the codebook tokens of an already-extended transformers tokenizer.

    Read from the tokenizer's added-token table, never by tokenizing the strings (newer tokenizers
    can return a SentencePiece "▁" piece first, official issue #23).
    """
    added = tokenizer.get_added_vocab()
    names = seg_token_strings(n, l)
    missing = [s for s in names if s not in added]
    if missing:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} lacks codebook tokens {missing} "
            f"(N={n}, L={l}); add them with add_codebook_tokens or use the checkpoint's tokenizer"
        )
    return [int(added[s]) for s in names]


def add_codebook_tokens(tokenizer, n: int, l: int) -> list[int]:
    """Add the codebook tokens (not special, as the official `add_tokens`) and return their ids."""
    tokenizer.add_tokens(seg_token_strings(n, l))
    return codebook_ids_from_tokenizer(tokenizer, n, l)


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
