"""Build a small real LLaMA-format tokenizer offline (SentencePiece `tokenizer.model` + config).

Route A of WEIGHT_FORMATS.md §4: a BPE SentencePiece model with byte fallback and the LLaMA special
ids (unk 0, bos 1, eos 2, no pad), which `transformers.AutoTokenizer` loads as a LLaMA tokenizer.
The tests train it on a few chat sentences; the demo trains it on the synthetic dataset's texts so
that colour and shape words get their own pieces.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

CHAT_TEXTS = (
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "USER: What is the cat in this image? Please output segmentation mask. ASSISTANT: Sure, it is.",
    "Can you segment the dog, the car and the tree in this image?",
    "Sure, the segmentation result is shown. The cat is on the left and the dog is on the right.",
    "What is the person holding an umbrella near the red bus, 0123456789?",
    "Please respond with segmentation mask. It is the fruit high in vitamin C.",
)

TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "add_bos_token": True,
    "add_eos_token": False,
    "legacy": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
}


def build_tiny_tokenizer(directory: str | Path, vocab_size: int = 420, texts: Iterable[str] = CHAT_TEXTS) -> Path:
    """Train `tokenizer.model` on `texts` and write `tokenizer_config.json` into `directory`; returns it."""
    import sentencepiece as spm

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sentences = list(texts)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences * max(1, 32 // len(sentences))),
        model_prefix=str(directory / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        split_digits=True,
        minloglevel=2,
    )
    (directory / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))
    return directory
