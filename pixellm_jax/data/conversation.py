"""The `llava_v1` conversation template and tokenisation as the released checkpoints saw it.

Prompts (reference §2.2). Training: "{system} USER: <im_start><image><im_end>\\n{question} ASSISTANT:
{answer}</s>USER: {question 2} ASSISTANT: {answer 2}</s>..."; inference ends with "ASSISTANT:" and no
trailing space. With `use_im_start_end` every "<image>" becomes "<im_start><image><im_end>".

Token ids. PixelLM was trained with the transformers 4.31 *slow* LLaMA tokenizer, which (reference
§11.5) splits the text at every added token (`<im_start>`, `[SEG0]`, ..., `</s>`), strips the
whitespace on both sides of the non-special added tokens, and encodes each remaining text piece on
its own with SentencePiece, so each piece gets its own "▁" dummy prefix. Newer tokenizers do
neither, so `LegacyTokenizer` rebuilds that behaviour piece by piece from the SentencePiece model
and the tokenizer's added-token table. As in LLaVA's `tokenizer_image_token`, the prompt is first
cut at "<image>" (no stripping there), each chunk is tokenised on its own, the image sentinel −200
goes between the chunks and BOS stays only at the start. Every `SEG_PLACEHOLDER` in an answer
becomes the N·L codebook ids from `codebook_ids_from_tokenizer`, never tokenised.

Labels (LLaVA v1 rule, official collate): BOS and each round's instruction, i.e. everything up to
and including "ASSISTANT:", are −100; the answers and each closing "</s>" are supervised. The
official code counts an instruction as len(tokens("... ASSISTANT: ")) − 2, which relies on LLaMA
encoding the trailing space as its own "▁" token; here it is len(tokens("... ASSISTANT:")) − 1, the
same count for LLaMA and also right for SentencePiece models that drop trailing spaces. Training
sequences are then cut to `model_max_length − (n_image_tokens − 1)` text tokens (official: 512 − 255
= 257), so that the image-expanded sequence fits `model_max_length`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pixellm_jax.data.sample import IMAGE_PLACEHOLDER, SEG_PLACEHOLDER
from pixellm_jax.tokens import IGNORE_INDEX, IMAGE_TOKEN, codebook_ids_from_tokenizer

IM_START = "<im_start>"
IM_END = "<im_end>"


@dataclass(frozen=True)
class ConversationTemplate:
    """A LLaVA `SeparatorStyle.TWO` template: turns end with `sep` (user) and `sep2` (assistant)."""

    system: str
    user: str
    assistant: str
    sep: str
    sep2: str

    @property
    def answer_sep(self) -> str:
        """What precedes every answer: " ASSISTANT: " (the official label rule splits rounds on it)."""
        return f"{self.sep}{self.assistant}: "


LLAVA_V1 = ConversationTemplate(
    system=(
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions."
    ),
    user="USER",
    assistant="ASSISTANT",
    sep=" ",
    sep2="</s>",
)


def _expand_image(text: str, use_im_start_end: bool) -> str:
    return text.replace(IMAGE_PLACEHOLDER, IM_START + IMAGE_PLACEHOLDER + IM_END) if use_im_start_end else text


def training_prompt(
    turns: Sequence[tuple[str, str]], use_im_start_end: bool = True, template: ConversationTemplate = LLAVA_V1
) -> str:
    """The full training string of a conversation, every answer closed by `sep2`."""
    if not turns:
        raise ValueError("a conversation needs at least one (question, answer) turn")
    text = template.system + template.sep
    for question, answer in turns:
        text += f"{template.user}: {question}{template.sep}{template.assistant}: {answer}{template.sep2}"
    return _expand_image(text, use_im_start_end)


def generation_prompt(
    question: str,
    history: Sequence[tuple[str, str]] = (),
    use_im_start_end: bool = True,
    template: ConversationTemplate = LLAVA_V1,
) -> str:
    """The prompt for generating the answer to `question` after the finished turns in `history`."""
    text = template.system + template.sep
    for q, a in history:
        text += f"{template.user}: {q}{template.sep}{template.assistant}: {a}{template.sep2}"
    text += f"{template.user}: {question}{template.sep}{template.assistant}:"
    return _expand_image(text, use_im_start_end)


class LegacyTokenizer:
    """transformers-4.31 slow LLaMA tokenisation, rebuilt from a piece encoder and the added tokens.

    encode_piece: text -> ids of one text piece, with the SentencePiece dummy prefix (4.31's
    `sp_model.encode`). added: added-token string -> id; every one splits the text. no_strip: the
    added tokens whose neighbouring whitespace is kept (LLaMA's `<s>`, `</s>`, `<unk>` are
    `AddedToken(lstrip=False, rstrip=False)`); all others strip both sides. seg_ids: the N·L codebook
    ids that each `SEG_PLACEHOLDER` stands for. Picklable, so Grain worker processes can use it.
    """

    def __init__(
        self,
        encode_piece: Callable[[str], list[int]],
        added: dict[str, int],
        no_strip: set[str],
        seg_ids: Sequence[int],
        bos_id: int,
        eos_id: int,
        pad_id: int,
    ):
        self.encode_piece = encode_piece
        self.seg_ids = [int(i) for i in seg_ids]
        self.bos_id, self.eos_id, self.pad_id = int(bos_id), int(eos_id), int(pad_id)
        self.no_strip = set(no_strip)
        # The placeholder maps to the whole codebook group; a real "[SEG]" token (N·L = 1) is the same id.
        self.added = {k: [int(v)] for k, v in added.items()}
        self.added[SEG_PLACEHOLDER] = list(self.seg_ids)
        names = sorted(self.added, key=len, reverse=True)  # longest match first, as the 4.31 trie
        self._split = re.compile("(" + "|".join(re.escape(n) for n in names) + ")")

    @classmethod
    def from_transformers(cls, tokenizer, seg_token_num: int, scale_num: int) -> "LegacyTokenizer":
        """From an extended transformers tokenizer (codebook and `<im_start>`/`<im_end>` already added).

        Text pieces are encoded by the SentencePiece model in `tokenizer.vocab_file` when there is one
        (exactly 4.31's `_tokenize`); a tokenizer without one (tokenizer.json only) encodes each piece
        itself, which for LLaMA-style Metaspace tokenizers prepends the same "▁".
        """
        seg_ids = codebook_ids_from_tokenizer(tokenizer, seg_token_num, scale_num)
        vocab_file = getattr(tokenizer, "vocab_file", None)
        if vocab_file and Path(vocab_file).is_file():
            import sentencepiece as spm

            encode_piece = _SentencePiecePieces(spm.SentencePieceProcessor(model_file=str(vocab_file)))
        else:
            encode_piece = _TransformersPieces(tokenizer)
        specials = {tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token, tokenizer.pad_token}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
        return cls(
            encode_piece,
            added=dict(tokenizer.get_added_vocab()),
            no_strip={s for s in specials if s},
            seg_ids=seg_ids,
            bos_id=tokenizer.bos_token_id,
            eos_id=tokenizer.eos_token_id,
            pad_id=pad,  # LLaVA pads with unk = 0
        )

    def split(self, text: str) -> list[str | list[int]]:
        """Text pieces (str) and added tokens (their ids), whitespace stripped as 4.31 does."""
        parts = self._split.split(text)  # odd positions are added tokens
        for i in range(1, len(parts), 2):
            if parts[i] in self.no_strip:
                continue
            parts[i - 1] = parts[i - 1].rstrip()
            parts[i + 1] = parts[i + 1].lstrip()
        return [self.added[p] if i % 2 else p for i, p in enumerate(parts) if i % 2 or p]

    def encode_chunk(self, text: str) -> list[int]:
        """Ids of text without "<image>" (no BOS)."""
        ids: list[int] = []
        for part in self.split(text):
            ids.extend(self.encode_piece(part) if isinstance(part, str) else part)
        return ids

    def encode(self, text: str) -> list[int]:
        """BOS + ids, with IMAGE_TOKEN (−200) where each "<image>" was (`tokenizer_image_token`)."""
        ids = [self.bos_id]
        for i, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if i:
                ids.append(IMAGE_TOKEN)
            ids.extend(self.encode_chunk(chunk))
        return ids


class _SentencePiecePieces:
    def __init__(self, processor):
        self.processor = processor

    def __call__(self, text: str) -> list[int]:
        return list(self.processor.encode(text))


class _TransformersPieces:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))


@dataclass
class TokenizedConversation:
    input_ids: np.ndarray  # [t] int32, one IMAGE_TOKEN
    labels: np.ndarray  # [t] int32, IGNORE_INDEX where not supervised
    num_seg_tokens: int  # codebook ids left in input_ids (a cut can leave a partial group)
    truncated: bool  # the sequence was cut to max_text_len


def training_labels(
    tok: LegacyTokenizer, prompt: str, input_ids: Sequence[int], template: ConversationTemplate = LLAVA_V1
) -> np.ndarray:
    """The LLaVA v1 label rule over a full training prompt (official collate_fn, see module doc)."""
    labels = np.asarray(input_ids, np.int32).copy()
    labels[:1] = IGNORE_INDEX
    cur = 1
    for round_text in prompt.split(template.sep2):
        if round_text == "":
            break
        parts = round_text.split(template.answer_sep)
        if len(parts) != 2:
            raise ValueError(f"a round must contain {template.answer_sep!r} exactly once: {round_text!r}")
        round_len = len(tok.encode(round_text))  # its BOS counts for the round's closing sep2
        instruction_len = len(tok.encode(parts[0] + template.sep + template.assistant + ":")) - 1
        labels[cur : cur + instruction_len] = IGNORE_INDEX
        cur += round_len
    if cur != len(labels):
        raise ValueError(f"label rule covers {cur} tokens but the prompt has {len(labels)}: {prompt!r}")
    return labels


def tokenize_training(
    tok: LegacyTokenizer,
    turns: Sequence[tuple[str, str]],
    max_text_len: int,
    use_im_start_end: bool = True,
    template: ConversationTemplate = LLAVA_V1,
) -> TokenizedConversation:
    """Token ids and labels of one training conversation, cut to `max_text_len` text tokens.

    max_text_len = model_max_length − (n_image_tokens − 1) reproduces the official truncation.
    Raises ValueError when the conversation has no single "<image>" or breaks the template.
    """
    prompt = training_prompt(turns, use_im_start_end, template)
    ids = tok.encode(prompt)
    if ids.count(IMAGE_TOKEN) != 1:
        raise ValueError(f"a conversation needs exactly one {IMAGE_PLACEHOLDER}, got {ids.count(IMAGE_TOKEN)}")
    labels = training_labels(tok, prompt, ids, template)
    input_ids = np.asarray(ids, np.int32)
    truncated = len(input_ids) > max_text_len
    input_ids, labels = input_ids[:max_text_len], labels[:max_text_len]
    if IMAGE_TOKEN not in input_ids:
        raise ValueError(f"truncation to {max_text_len} tokens removes the image")
    n_seg = int(np.isin(input_ids, tok.seg_ids).sum())
    return TokenizedConversation(input_ids, labels, n_seg, truncated)


def tokenize_generation(
    tok: LegacyTokenizer,
    question: str,
    history: Sequence[tuple[str, str]] = (),
    use_im_start_end: bool = True,
    template: ConversationTemplate = LLAVA_V1,
) -> np.ndarray:
    """Prompt ids [t] int32 for generating an answer (ends with the tokens of "ASSISTANT:")."""
    return np.asarray(tok.encode(generation_prompt(question, history, use_im_start_end, template)), np.int32)
