"""Evaluation batching, answer text with numbered targets, and split specs (host only, no model)."""

import numpy as np
import pytest

from pixellm_jax.data.conversation import LegacyTokenizer
from pixellm_jax.data.sample import BadSample, Conversation, Sample, Source
from pixellm_jax.data.synthetic import SyntheticShapes
from pixellm_jax.eval.answer_text import number_placeholders, numbered_answer
from pixellm_jax.eval.batches import BatchShape, eval_batches, token_bucket
from pixellm_jax.eval.splits import parse_split
from pixellm_jax.tokens import IMAGE_TOKEN

SEG = [90, 91, 92, 93, 94, 95]


def tokenizer():
    """A character-level stand-in with the LegacyTokenizer behaviour (ids = code points mod 80 + 3)."""
    added = {f"[SEG{i}]": s for i, s in enumerate(SEG)} | {"<im_start>": 96, "<im_end>": 97, "</s>": 2}
    return LegacyTokenizer(lambda text: [ord(c) % 80 + 3 for c in text], added, {"</s>"}, SEG, 1, 2, 0)


class Shapes(Source):
    """Images of different sizes with 3, 1 and 4 conversations; index 3 is unreadable."""

    name = "shapes"
    sizes = [(30, 50), (70, 20), (40, 40), (10, 10), (33, 44)]
    convs = [3, 1, 4, 1, 2]

    def __len__(self):
        return len(self.sizes)

    def get(self, index, rng):
        if index == 3:
            raise BadSample("shapes:3", "corrupt")
        h, w = self.sizes[index]
        convs = [Conversation([(f"<image>\nq{index}.{c}" + "x" * c, "It is [SEG].")], np.ones((1, h, w), bool))
                 for c in range(self.convs[index])]
        return Sample(f"shapes:{index}", "shapes", np.zeros((h, w, 3), np.uint8), convs)


def test_packing_rows_images_and_padding():
    shape = BatchShape(images=2, rows=4, image_size=28, token_buckets=(160, 256), canvas_step=16)
    skipped = []
    batches = list(eval_batches(Shapes(), tokenizer(), "generate", shape, skipped=skipped))
    assert skipped == [("shapes:3", "corrupt")]
    got = [[(it.sample_index, it.conversation) for it in b.items] for b in batches]
    # rows fill up to 4, images up to 2; sample 2 (4 questions) continues in the next batch
    assert got == [[(0, 0), (0, 1), (0, 2), (1, 0)], [(2, 0), (2, 1), (2, 2), (2, 3)], [(4, 0), (4, 1)]]
    first = batches[0].arrays
    assert first["conv_image"].tolist() == [0, 0, 0, 1] and first["conv_valid"].all()
    assert first["original_hw"].tolist() == [[30, 50], [70, 20]] and batches[0].out_hw == (80, 64)
    last = batches[2].arrays
    assert last["conv_valid"].tolist() == [True, True, False, False]
    np.testing.assert_array_equal(last["input_ids"][2], last["input_ids"][0])  # padding copies row 0
    np.testing.assert_array_equal(last["pixels"][1], last["pixels"][0])
    for b in batches:
        ids, mask = b.arrays["input_ids"], b.arrays["attention_mask"]
        assert ids.shape == (4, 256) and ((ids == IMAGE_TOKEN).sum(1) == 1).all()
        assert (mask.sum(1) == [len(it.input_ids) for it in b.items] + [len(b.items[0].input_ids)] * (4 - len(b.items))).all()
    assert batches[1].items[3].question == "q2.3xxx" and batches[1].items[3].gt.shape == (1, 40, 40)
    assert token_bucket(40, (16, 32)) == 64 and token_bucket(16, (16, 32)) == 16


def test_blocks_keep_each_row_with_its_image():
    """groups=2: each half of a batch packs on its own, rows point into their own half's images."""
    shape = BatchShape(images=4, rows=6, image_size=28, token_buckets=(256,), groups=2)
    batches = list(eval_batches(Shapes(), tokenizer(), "generate", shape))
    flat = [(it.sample_index, it.conversation) for b in batches for it in b.items]
    ungrouped = BatchShape(images=2, rows=3, image_size=28, token_buckets=(256,))
    assert flat == [(it.sample_index, it.conversation) for b in eval_batches(Shapes(), tokenizer(), "generate", ungrouped)
                    for it in b.items]  # the same rows in the same order
    first = batches[0]
    # block 0: sample 0's 3 questions; block 1: sample 1, then sample 2's first 2 (its rows are full)
    assert first.rows == [0, 1, 2, 3, 4, 5] and first.arrays["conv_image"].tolist() == [0, 0, 0, 2, 3, 3]
    assert first.arrays["original_hw"].tolist() == [[30, 50], [30, 50], [70, 20], [40, 40]]
    last = batches[-1]  # block 0: sample 2's last 2 questions and sample 4's first; block 1: sample 4's last
    assert [(it.sample_index, it.conversation) for it in last.items] == [(2, 2), (2, 3), (4, 0), (4, 1)]
    assert last.rows == [0, 1, 2, 3] and last.arrays["conv_valid"].tolist() == [True] * 4 + [False] * 2
    assert last.arrays["conv_image"].tolist() == [0, 0, 1, 2, 2, 2]  # padding rows stay in their block
    np.testing.assert_array_equal(last.arrays["input_ids"][5], last.arrays["input_ids"][3])
    np.testing.assert_array_equal(last.arrays["pixels"][3], last.arrays["pixels"][2])
    for b in batches:
        image, valid = b.arrays["conv_image"], b.arrays["conv_valid"]
        assert ((image // 2) == np.arange(6) // 3).all()  # every row's image is in its block
        for row, item in b.placed():
            assert valid[row] and b.arrays["original_hw"][image[row]].tolist() == list(item.gt.shape[1:])
    with pytest.raises(ValueError, match="do not split into 4 blocks"):
        next(eval_batches(Shapes(), tokenizer(), "generate", BatchShape(images=4, rows=6, groups=4)))


def test_teacher_forced_rows_hold_the_answer_and_processes_share_samples():
    shape = BatchShape(images=2, rows=4, image_size=28, token_buckets=(256,))
    tok = tokenizer()
    tf = next(iter(eval_batches(Shapes(), tok, "teacher_forced", shape)))
    gen = next(iter(eval_batches(Shapes(), tok, "generate", shape)))
    assert np.isin(tf.items[0].input_ids, SEG).sum() == 6 and not np.isin(gen.items[0].input_ids, SEG).any()
    shares = [[it.sample_index for b in eval_batches(Shapes(), tok, "generate", shape, process_index=p, process_count=2)
               for it in b.items] for p in range(2)]
    assert sorted(set(shares[0])) == [0, 2, 4] and sorted(set(shares[1])) == [1]


def test_numbered_answer():
    decode = lambda ids: " ".join(f"w{i}" for i in ids)  # noqa: E731
    tokens = [5, *SEG, 6, 7, *SEG, 8, 2, 0, 0]
    assert numbered_answer(decode, tokens, SEG, 6, eos_id=2) == ("w5 [1] w6 w7 [2] w8", 2)
    assert numbered_answer(lambda ids: "Sure," if ids == [5] else ".", [5, *SEG, 9], SEG, 6, 2) == ("Sure, [1].", 1)
    assert numbered_answer(decode, [5, *SEG[:3], 2], SEG, 6, eos_id=2) == ("w5 w90 w91 w92", 0)  # malformed
    assert number_placeholders("a is [SEG] and b is [SEG].") == "a is [1] and b is [2]."


def test_split_specs(tmp_path):
    s = parse_split("mine=synthetic:num_samples=3,seed=2")
    assert (s.name, s.protocol, len(s.source)) == ("mine", "generate", 3)
    assert isinstance(s.source, SyntheticShapes) and s.source.seed == 2
    assert parse_split("synthetic:num_samples=2,protocol=teacher_forced").protocol == "teacher_forced"
    with pytest.raises(ValueError, match="needs data_dir"):
        parse_split("tfds:name=pixellm_records/synthetic,split=val")
    with pytest.raises(ValueError, match="refer_seg"):  # the official layout, absent here: named in the error
        parse_split("refer_seg", dataset_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown kind"):
        parse_split("coco:x=1")
    with pytest.raises(ValueError, match="protocol"):
        parse_split("synthetic:protocol=beam")
    with pytest.raises(ValueError, match="unexpected keyword"):
        parse_split("synthetic:colour=red")


def test_prepared_tfds_split(tmp_path):
    from pixellm_jax.cli import main

    assert main(["prepare-data", "--source", "synthetic", "--num-samples", "2", "--out", str(tmp_path)]) == 0
    s = parse_split(f"tfds:name=pixellm_records/synthetic,split=train,data_dir={tmp_path},questions_per_image=1")
    assert (s.name, s.protocol, len(s.source)) == ("synthetic_train", "generate", 2)
    assert len(s.source.get(0, np.random.default_rng(0)).conversations) == 1
