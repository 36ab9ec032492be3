"""The token ids every layer agrees on: the image sentinel, the ignored label, the codebook tokens.

The data pipeline writes them, the model reads them, conversion and training add the codebook to a
tokenizer; all of them take the values and the codebook-token helpers from here.
The codebook has N tokens per level and L levels (reference §1.5), `[SEG0]`..`[SEG{N·L−1}]`.
"""

from __future__ import annotations

IMAGE_TOKEN = -200  # where a sample's image tokens are spliced in (LLaVA's IMAGE_TOKEN_INDEX)
IGNORE_INDEX = -100  # a label that is not supervised (torch's cross-entropy ignore_index)


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
