"""llava_v1 prompts, 4.31-style piece-by-piece token ids, label masking and truncation (reference §2.2, §11.5).

Expected ids are assembled here from the SentencePiece encoding of each text piece, following the
rules of §11.5 (split at added tokens, strip whitespace around them, a dummy prefix per piece).
"""

import json

import numpy as np
import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from pixellm_jax.data.conversation import (
    LLAVA_V1,
    LegacyTokenizer,
    generation_prompt,
    tokenize_generation,
    tokenize_training,
    training_labels,
    training_prompt,
)
from pixellm_jax.tokens import add_codebook_tokens
from tests.tiny_tokenizer import TOKENIZER_CONFIG, _TEXTS, build_tiny_tokenizer

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
IMG = -200
IGN = -100


def _extend(directory):
    tok = AutoTokenizer.from_pretrained(directory)
    seg = add_codebook_tokens(tok, 3, 2)
    tok.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)
    return tok, seg


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    tok, seg = _extend(directory)
    sp = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    added = tok.get_added_vocab()
    return LegacyTokenizer.from_transformers(tok, 3, 2), sp, seg, added["<im_start>"], added["<im_end>"]


@pytest.fixture(scope="module")
def llama_like(tmp_path_factory):
    """Same recipe but keeping whitespace like LLaMA's tokenizer.model (remove_extra_whitespaces=false)."""
    directory = tmp_path_factory.mktemp("tok_ws")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_TEXTS * 4), model_prefix=str(directory / "tokenizer"), vocab_size=420,
        model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, add_dummy_prefix=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, minloglevel=2)
    (directory / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    tok, seg = _extend(directory)
    sp = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    added = tok.get_added_vocab()
    return LegacyTokenizer.from_transformers(tok, 3, 2), sp, seg, added["<im_start>"], added["<im_end>"]


def test_template_strings():
    turns = [("<image>\nWhat is the cat in this image?", "Sure, it is [SEG]."), ("And the dog?", "[SEG].")]
    assert training_prompt(turns) == (
        f"{SYSTEM} USER: <im_start><image><im_end>\nWhat is the cat in this image? ASSISTANT: Sure, it is [SEG].</s>"
        "USER: And the dog? ASSISTANT: [SEG].</s>"
    )
    assert training_prompt(turns[:1], use_im_start_end=False) == (
        f"{SYSTEM} USER: <image>\nWhat is the cat in this image? ASSISTANT: Sure, it is [SEG].</s>"
    )
    assert generation_prompt("<image>\nWhat is the cat?") == (
        f"{SYSTEM} USER: <im_start><image><im_end>\nWhat is the cat? ASSISTANT:"
    )
    assert generation_prompt("And the dog?", history=turns[:1], use_im_start_end=False) == (
        f"{SYSTEM} USER: <image>\nWhat is the cat in this image? ASSISTANT: Sure, it is [SEG].</s>"
        "USER: And the dog? ASSISTANT:"
    )
    assert LLAVA_V1.answer_sep == " ASSISTANT: "
    with pytest.raises(ValueError):
        training_prompt([])


def test_known_pieces(tiny):
    # Anchors for the reasoning below: how the tiny model encodes some pieces.
    _, sp, _, _, _ = tiny
    assert sp.encode(".", out_type=str) == ["▁", "."]
    assert sp.encode("and", out_type=str) == ["▁and"]
    assert sp.encode("\nWhat", out_type=str) == ["▁", "<0x0A>", "W", "hat"]
    assert sp.id_to_piece(13) == "<0x0A>"


def test_single_turn_ids_and_labels(tiny):
    tok, sp, seg, im_start, im_end = tiny
    turns = [("<image>\nWhat is the cat in this image?", "Sure, it is [SEG].")]
    out = tokenize_training(tok, turns, max_text_len=1000)
    instruction = SYSTEM + " USER:"
    answer_piece = "What is the cat in this image? ASSISTANT: Sure, it is"
    expected = (
        [1] + sp.encode(instruction) + [im_start, IMG, im_end] + sp.encode(answer_piece) + seg + sp.encode(".") + [2]
    )
    assert out.input_ids.tolist() == expected
    assert out.input_ids.dtype == np.int32 and not out.truncated and out.num_seg_tokens == 6
    assert 13 not in expected  # the newline after <im_end> is stripped away (§11.5)
    # Labels: everything up to and including "ASSISTANT:" is ignored; the answer and </s> are supervised.
    n_question = len(sp.encode("What is the cat in this image? ASSISTANT:"))
    assert sp.encode(answer_piece)[:n_question] == sp.encode("What is the cat in this image? ASSISTANT:")
    n_ignored = 1 + len(sp.encode(instruction)) + 3 + n_question
    assert (out.labels[:n_ignored] == IGN).all()
    np.testing.assert_array_equal(out.labels[n_ignored:], out.input_ids[n_ignored:])
    assert out.labels[-1] == 2 and out.labels[n_ignored] == sp.encode("Sure")[0]


def test_multi_turn_and_seg_first_answers(tiny):
    tok, sp, seg, im_start, im_end = tiny
    turns = [
        ("<image>\nCan you segment the dog, the car and the tree in this image?",
         "dog is [SEG], car is [SEG] and tree is [SEG]."),
        ("What is the person?", "[SEG] and [SEG]."),
    ]
    out = tokenize_training(tok, turns, max_text_len=1000)
    r1_instr = sp.encode("Can you segment the dog, the car and the tree in this image? ASSISTANT:")
    r1 = (
        sp.encode("Can you segment the dog, the car and the tree in this image? ASSISTANT: dog is")
        + seg + sp.encode(", car is") + seg + sp.encode("and tree is") + seg + sp.encode(".") + [2]
    )
    r2_instr = sp.encode("USER: What is the person? ASSISTANT:")
    r2 = r2_instr + seg + sp.encode("and") + seg + sp.encode(".") + [2]
    head = [1] + sp.encode(SYSTEM + " USER:") + [im_start, IMG, im_end]
    assert out.input_ids.tolist() == head + r1 + r2
    assert out.num_seg_tokens == 5 * 6
    labels = [IGN] * len(head) + [IGN] * len(r1_instr) + r1[len(r1_instr):] + [IGN] * len(r2_instr) + r2[len(r2_instr):]
    assert out.labels.tolist() == labels


def test_truncation(tiny):
    tok, sp, seg, _, _ = tiny
    turns = [("<image>\nWhat is the cat in this image?", "Sure, it is [SEG].")]
    full = tokenize_training(tok, turns, max_text_len=1000)
    n = len(full.input_ids)
    drop = 1 + len(sp.encode(".")) + 2  # "</s>", ".", [SEG5], [SEG4]
    cut = tokenize_training(tok, turns, max_text_len=n - drop)
    assert cut.truncated and len(cut.input_ids) == n - drop
    np.testing.assert_array_equal(cut.input_ids, full.input_ids[: n - drop])
    np.testing.assert_array_equal(cut.labels, full.labels[: n - drop])
    assert cut.num_seg_tokens == 4
    exact = tokenize_training(tok, turns, max_text_len=n)
    assert not exact.truncated and len(exact.input_ids) == n
    with pytest.raises(ValueError, match="removes the image"):
        tokenize_training(tok, turns, max_text_len=5)


def test_official_max_text_len_is_257():
    from pixellm_jax.data.pipeline import PipelineConfig

    assert PipelineConfig(model_max_length=512, n_image_tokens=256).max_text_len == 257


def test_without_im_start_end_chunks_keep_their_whitespace(tiny):
    tok, sp, seg, _, _ = tiny
    turns = [("<image>\nWhat is the cat?", "It is [SEG].")]
    out = tokenize_training(tok, turns, max_text_len=1000, use_im_start_end=False)
    # tokenizer_image_token: chunks split at <image> are encoded whole, the newline stays.
    expected = ([1] + sp.encode(SYSTEM + " USER: ") + [IMG] + sp.encode("\nWhat is the cat? ASSISTANT: It is")
                + seg + sp.encode(".") + [2])
    assert out.input_ids.tolist() == expected and 13 in expected


def test_special_tokens_keep_whitespace_added_tokens_strip(tiny):
    tok, sp, seg, im_start, _ = tiny
    assert tok.split("a\n<im_start>\nb") == ["a", [im_start], "b"]
    assert tok.split("a\n</s>\nb") == ["a\n", [2], "\nb"]
    assert tok.split("x [SEG] [SEG] y") == ["x", seg, seg, "y"]
    assert tok.split("[SEG0]  [SEG5].") == [[seg[0]], [seg[5]], "."]
    assert tok.encode("a\n</s>\nb") == [1] + sp.encode("a\n") + [2] + sp.encode("\nb")


def test_generation_prompt_ids(tiny):
    tok, sp, _, im_start, im_end = tiny
    ids = tokenize_generation(tok, "<image>\nWhat is the cat?")
    expected = [1] + sp.encode(SYSTEM + " USER:") + [im_start, IMG, im_end] + sp.encode("What is the cat? ASSISTANT:")
    assert ids.tolist() == expected and ids.dtype == np.int32


def test_bad_conversations(tiny):
    tok = tiny[0]
    with pytest.raises(ValueError, match="exactly one"):
        tokenize_training(tok, [("What is the cat?", "It is [SEG].")], 1000)
    with pytest.raises(ValueError, match="exactly one"):
        tokenize_training(tok, [("<image>\n<image>", "It is [SEG].")], 1000)
    with pytest.raises(ValueError, match="exactly once"):
        tokenize_training(tok, [("<image>\nsay ASSISTANT: hi", "It is [SEG].")], 1000)


def test_llama_like_whitespace_and_official_label_formula(llama_like):
    tok, sp, seg, im_start, im_end = llama_like
    # This model keeps spaces (as LLaMA's): a trailing space is its own "▁" piece ...
    assert sp.encode("USER: ", out_type=str)[-1] == "▁"
    assert sp.encode("ASSISTANT: ") == sp.encode("ASSISTANT:") + [sp.piece_to_id("▁")]
    turns = [("<image>\nWhat is the cat in this image?", "Sure, it is [SEG]."), ("And the dog?", "[SEG].")]
    out = tokenize_training(tok, turns, max_text_len=1000)
    # ... which the 4.31 tokenizer strips next to an added token: no "▁" before <im_start> or [SEG0].
    expected = (
        [1] + sp.encode(SYSTEM + " USER:") + [im_start, IMG, im_end]
        + sp.encode("What is the cat in this image? ASSISTANT: Sure, it is") + seg + sp.encode(".") + [2]
        + sp.encode("USER: And the dog? ASSISTANT:") + seg + sp.encode(".") + [2]
    )
    assert out.input_ids.tolist() == expected
    # The official count len(tokens(round_prefix + " ASSISTANT: ")) - 2 gives the same labels here.
    prompt = training_prompt(turns)
    labels = np.asarray(out.input_ids).copy()
    labels[:1] = IGN
    cur = 1
    for rnd in prompt.split("</s>")[:-1]:
        instr = rnd.split(" ASSISTANT: ")[0] + " ASSISTANT: "
        labels[cur : cur + len(tok.encode(instr)) - 2] = IGN
        cur += len(tok.encode(rnd))
    assert cur == len(labels)
    np.testing.assert_array_equal(out.labels, labels)
    np.testing.assert_array_equal(training_labels(tok, prompt, out.input_ids), labels)


def test_pieces_from_transformers_without_sentencepiece_file(tiny, tmp_path):
    # A tokenizer.json-only tokenizer encodes each stripped piece itself; on text without extra
    # whitespace that equals the SentencePiece encoding.
    directory = build_tiny_tokenizer(tmp_path / "t")
    tok, _ = _extend(directory)
    tok.vocab_file = None
    fallback = LegacyTokenizer.from_transformers(tok, 3, 2)
    turns = [("<image>\nWhat is the cat in this image?", "Sure, it is [SEG].")]
    a = tokenize_training(fallback, turns, 1000)
    b = tokenize_training(tiny[0], turns, 1000)
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.labels, b.labels)
