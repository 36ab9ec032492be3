"""The Grain pipeline: fixed shapes and content, determinism, resume, process shares, mixture, bad data."""

import json
import logging

import numpy as np
import pytest
from transformers import AutoTokenizer

from pixellm_jax.data.conversation import LegacyTokenizer, tokenize_training
from pixellm_jax.data.pipeline import DROP_CHECK_AFTER, InputPipeline, NothingUsable, PipelineConfig, TooManyDropped
from pixellm_jax.data.sample import DROP_REASONS
from pixellm_jax.data.sample import BadSample, Conversation, Sample, Source
from pixellm_jax.data.synthetic import SyntheticShapes
from pixellm_jax.data.transforms import masks_to_canvas, preprocess_image
from pixellm_jax.tokens import IMAGE_TOKEN, add_codebook_tokens
from tests.tiny_tokenizer import build_tiny_tokenizer

BUCKETS = [96, 128, 160, 257]
KEYS = {
    "pixels": np.float32, "resized_hw": np.int32, "original_hw": np.int32, "mask_hw": np.int32,
    "image_valid": np.bool_, "stream_index": np.int64, "input_ids": np.int32, "attention_mask": np.bool_,
    "labels": np.int32, "conv_image": np.int32, "conv_valid": np.bool_, "masks": np.bool_, "mask_valid": np.bool_,
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    hf = AutoTokenizer.from_pretrained(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")))
    add_codebook_tokens(hf, 3, 2)
    hf.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)
    return LegacyTokenizer.from_transformers(hf, 3, 2)


def _cfg(**kw):
    base = dict(images_per_batch=2, conversations_per_batch=4, max_targets=3, token_buckets=BUCKETS,
                image_size=56, mask_size=72, n_image_tokens=4, model_max_length=260, seed=0, read_threads=1)
    base.update(kw)
    return PipelineConfig(**base)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


class Named(Source):
    """A synthetic source under another name (for mixtures)."""

    def __init__(self, name, n, seed):
        self.name, self.inner = name, SyntheticShapes(num_samples=n, seed=seed, questions_per_image=1)

    def __len__(self):
        return len(self.inner)

    def get(self, index, rng):
        s = self.inner.get(index, rng)
        return Sample(f"{self.name}:{index}", self.name, s.image, s.conversations)


class Flaky(Source):
    """Every 5th record raises BadSample, every 7th has masks that do not fit its image."""

    name = "flaky"

    def __init__(self, n=40):
        self.inner = SyntheticShapes(num_samples=n, questions_per_image=1)

    def __len__(self):
        return len(self.inner)

    def get(self, index, rng):
        if index % 5 == 0:
            raise BadSample(f"flaky:{index}", "corrupt image")
        s = self.inner.get(index, rng)
        if index % 7 == 0:
            c = s.conversations[0]
            return Sample(f"flaky:{index}", "flaky", s.image, [Conversation(c.turns, c.masks[:, :10, :10])])
        return s


def test_fixed_shapes_and_content(tok):
    cfg = _cfg()
    src = SyntheticShapes(num_samples=64)
    pipe = InputPipeline([src], tok, cfg, process_index=0, process_count=1)
    seen_t = set()
    for batch in _take(iter(pipe), 8):
        assert set(batch) == set(KEYS)
        for k, dt in KEYS.items():
            assert batch[k].dtype == dt, k
        t = batch["input_ids"].shape[1]
        seen_t.add(t)
        assert batch["pixels"].shape == (2, 56, 56, 3) and batch["masks"].shape == (4, 3, 72, 72)
        assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (4, t)
        lengths = batch["attention_mask"].sum(1)
        assert t in BUCKETS and t == min(b for b in BUCKETS if b >= lengths.max())
        assert batch["image_valid"].all()
        for j in range(4):
            if not batch["conv_valid"][j]:
                assert lengths[j] == 0 and not batch["mask_valid"][j].any() and not batch["masks"][j].any()
                continue
            ids, labels, n = batch["input_ids"][j], batch["labels"][j], lengths[j]
            assert batch["attention_mask"][j, :n].all() and (ids[n:] == tok.pad_id).all() and (labels[n:] == -100).all()
            assert (ids[:n] == IMAGE_TOKEN).sum() == 1
            k = int(batch["mask_valid"][j].sum())
            assert batch["mask_valid"][j, :k].all() and k >= 1
            assert np.isin(ids, tok.seg_ids).sum() == 6 * k
        # Content: re-derive every image and conversation from the source and the documented rng.
        convs = iter(np.flatnonzero(batch["conv_valid"]))
        for row in range(2):
            position = int(batch["stream_index"][row])
            source_id, index = pipe.stream()[position]
            assert source_id == 0
            sample = src.get(index, np.random.default_rng([cfg.seed, position]))
            image = preprocess_image(sample.image, 56)
            np.testing.assert_array_equal(batch["pixels"][row], image.pixels)
            assert tuple(batch["resized_hw"][row]) == image.resized_hw
            assert tuple(batch["original_hw"][row]) == image.original_hw == sample.image.shape[:2]
            for c in sample.conversations:
                j = next(convs)
                assert batch["conv_image"][j] == row
                ref = tokenize_training(tok, c.turns, cfg.max_text_len)
                n = len(ref.input_ids)
                np.testing.assert_array_equal(batch["input_ids"][j, :n], ref.input_ids)
                np.testing.assert_array_equal(batch["labels"][j, :n], ref.labels)
                canvas, hw = masks_to_canvas(c.masks, 72)
                assert tuple(batch["mask_hw"][row]) == hw
                np.testing.assert_array_equal(batch["masks"][j, : len(canvas)], canvas)
    assert len(seen_t) >= 2  # several buckets in use


def test_same_seed_same_batches(tok):
    def make(seed):
        return InputPipeline([SyntheticShapes(num_samples=30)], tok, _cfg(seed=seed), process_index=0, process_count=1)

    a, b, c = (_take(iter(make(s)), 4) for s in (0, 0, 1))
    _assert_same(a, b)
    assert any(not np.array_equal(x["pixels"], y["pixels"]) for x, y in zip(a, c))


def test_restore_state_continues_identically(tok):
    def make():
        return InputPipeline([SyntheticShapes(num_samples=20)], tok, _cfg(), process_index=0, process_count=1)

    it = iter(make())
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # as stored in a checkpoint
    expected = _take(it, 12)  # crosses the 10-batch epoch boundary (reshuffled epoch)
    fresh = iter(make())
    fresh.set_state(state)
    _assert_same(_take(fresh, 12), expected)


def test_two_processes_share_an_epoch(tok):
    src = SyntheticShapes(num_samples=41)
    cfg = _cfg(num_epochs=1, drop_remainder=False)
    stream, ids, last = [], [], []
    for p in range(2):
        pipe = InputPipeline([src], tok, cfg, process_index=p, process_count=2)
        batches = list(iter(pipe))
        assert all(b["pixels"].shape == (2, 56, 56, 3) for b in batches)
        idx = np.concatenate([b["stream_index"][b["image_valid"]] for b in batches])
        stream.append(set(idx.tolist()))
        ids += [r.sample_id for r in pipe.records()]
        last.append(batches[-1]["image_valid"].tolist())
    assert not stream[0] & stream[1]
    assert stream[0] | stream[1] == set(range(41))
    assert sorted(ids) == sorted(f"synthetic:{i}" for i in range(41))  # every record once per epoch
    assert last == [[True, False], [True, True]]  # 21 and 20 records


def test_partial_last_batch_is_padded(tok):
    pipe = InputPipeline([SyntheticShapes(num_samples=5)], tok, _cfg(num_epochs=1, drop_remainder=False),
                         process_index=0, process_count=1)
    batches = list(iter(pipe))
    assert len(batches) == 3
    last = batches[-1]
    assert last["image_valid"].tolist() == [True, False] and last["stream_index"][1] == -1
    assert not last["pixels"][1].any() and (last["conv_image"][last["conv_valid"]] == 0).all()
    assert pipe.stats.samples == 5 and pipe.stats.batches == 3


def test_mixture_rates_and_epochs(tok):
    a, b = Named("a", 12, 1), Named("b", 30, 2)
    pipe = InputPipeline([a, b], tok, _cfg(epoch_size=40), sample_rates=[1, 3], process_index=0, process_count=1)
    records = pipe.records()
    first = [records[i].sample_id for i in range(40)]
    assert sum(r.startswith("a:") for r in first) == 10 and sum(r.startswith("b:") for r in first) == 30
    assert len(set(first)) == 40  # no record twice within an epoch
    second = [records[i].sample_id for i in range(40, 80)]
    assert first != second
    # Default epoch: the most records without any source repeating (min over len / share).
    assert InputPipeline([a, b], tok, _cfg(), sample_rates=[1, 3], process_index=0, process_count=1).epoch_size == 40
    assert InputPipeline([a, b], tok, _cfg(), sample_rates=[1, 1], process_index=0, process_count=1).epoch_size == 24


def test_bad_samples_skipped_and_counted(tok, caplog):
    cfg = _cfg(num_epochs=1, drop_remainder=False, images_per_batch=4, conversations_per_batch=4)
    pipe = InputPipeline([Flaky(40)], tok, cfg, process_index=0, process_count=1)
    with caplog.at_level(logging.WARNING, logger="pixellm_jax.data.pipeline"):
        batches = list(iter(pipe))
    bad = {i for i in range(40) if i % 5 == 0 or i % 7 == 0}
    assert pipe.stats.bad_samples == len(bad)
    kept = sum(int(b["image_valid"].sum()) for b in batches)
    assert kept == 40 - len(bad)
    assert "flaky:35" in caplog.text and "corrupt image" in caplog.text
    assert "flaky:14" in caplog.text and "masks" in caplog.text
    assert all(b["pixels"].shape == (4, 56, 56, 3) for b in batches)


def test_bad_samples_counted_by_reason(tok):
    cfg = _cfg(num_epochs=1, drop_remainder=False, images_per_batch=4, conversations_per_batch=4)
    pipe = InputPipeline([Flaky(40)], tok, cfg, process_index=0, process_count=1)
    list(iter(pipe))
    metrics = pipe.stats.as_metrics()
    corrupt = sum(i % 5 == 0 for i in range(40))  # "corrupt image" (i % 5), mis-shaped masks otherwise
    assert metrics["dropped/bad_image"] >= corrupt and metrics["bad_samples"] == pipe.stats.bad_samples
    assert sum(metrics[f"dropped/{r}"] for r in DROP_REASONS) == pipe.stats.bad_samples
    assert metrics["kept_conversations"] == pipe.stats.conversations > 0
    assert 0 < metrics["drop_fraction"] < 1


def test_drop_fraction_past_the_limit_stops_naming_the_reason(tok):
    src = SyntheticShapes(num_samples=300, questions_per_image=1, kind_weights=(0.2, 0.8, 0))
    cfg = _cfg(max_targets=1, max_drop_fraction=0.2)  # most questions have 2-3 targets
    pipe = InputPipeline([src], tok, cfg, process_index=0, process_count=1)
    with pytest.raises(TooManyDropped, match=r"data.max_drop_fraction=0.2.*most were too_many_targets.*"
                                             r"raise model.head.max_targets"):
        _take(iter(pipe), 100)
    assert pipe.stats.units >= DROP_CHECK_AFTER
    # Under the limit (or with none) the same data just runs, counted.
    pipe = InputPipeline([src], tok, _cfg(max_targets=1), process_index=0, process_count=1)
    _take(iter(pipe), 5)
    assert pipe.stats.drop_fraction > 0.2


def test_bad_samples_raise_by_flag(tok):
    pipe = InputPipeline([Flaky(40)], tok, _cfg(on_bad_sample="raise"), process_index=0, process_count=1)
    with pytest.raises(BadSample, match=r"flaky:\d+: (corrupt image|conversation 0 masks)"):
        _take(iter(pipe), 20)


def test_overflow_is_dropped_and_counted(tok):
    src = SyntheticShapes(num_samples=30, questions_per_image=3, kind_weights=(0, 1, 0))  # 2-3 targets each
    pipe = InputPipeline([src], tok, _cfg(conversations_per_batch=2, max_targets=2), process_index=0, process_count=1)
    batches = _take(iter(pipe), 5)
    assert pipe.stats.dropped["too_many_targets"] > 0
    assert pipe.stats.dropped["batch_full"] > 0
    for b in batches:
        assert b["masks"].shape == (2, 2, 72, 72) and b["conv_valid"].all()
    # One multi-target question per image and max_targets 1: such samples lose their only conversation.
    single = SyntheticShapes(num_samples=30, questions_per_image=1, kind_weights=(0, 1, 0))
    pipe = InputPipeline([single], tok, _cfg(max_targets=1, num_epochs=1, drop_remainder=False),
                         process_index=0, process_count=1)
    kept = sum(int(b["image_valid"].sum()) for b in iter(pipe))
    dropped = pipe.stats.samples_without_conversations
    assert dropped > 0 and dropped == pipe.stats.dropped["too_many_targets"] and kept + dropped == 30
    assert pipe.stats.conversations == kept and pipe.stats.drop_fraction == dropped / 30


def test_truncation_drops_cut_targets_and_long_conversations(tok):
    src = SyntheticShapes(num_samples=30, questions_per_image=1)  # conversations of 122-190 tokens
    # 4 image tokens and model_max_length 140: 137 text tokens, shorter than a good part of them.
    pipe = InputPipeline([src], tok, _cfg(model_max_length=140, token_buckets=[137]), process_index=0, process_count=1)
    for b in _take(iter(pipe), 3):
        assert b["input_ids"].shape[1] == 137
        for j in np.flatnonzero(b["conv_valid"]):
            assert np.isin(b["input_ids"][j], tok.seg_ids).sum() == 6 * b["mask_valid"][j].sum()
    assert pipe.stats.dropped["targets_truncated"] > 0
    pipe = InputPipeline([src], tok, _cfg(token_buckets=[130, 150]), process_index=0, process_count=1)
    for b in _take(iter(pipe), 3):
        assert b["input_ids"].shape[1] in (130, 150)
    assert pipe.stats.dropped["too_long"] > 0


def test_config_that_drops_everything_raises_instead_of_spinning(tok):
    src = SyntheticShapes(num_samples=30, questions_per_image=1)
    pipe = InputPipeline([src], tok, _cfg(model_max_length=112, token_buckets=[109]), process_index=0, process_count=1)
    with pytest.raises(NothingUsable, match=r"last 31 records of \['synthetic.*most were targets_truncated.*"
                                            r"raise data.model_max_length"):
        next(iter(pipe))
    # A finite stream whose only epoch is dropped whole just ends.
    pipe = InputPipeline([src], tok, _cfg(model_max_length=112, token_buckets=[109], num_epochs=1),
                         process_index=0, process_count=1)
    assert list(pipe) == [] and pipe.stats.samples_without_conversations == 30


def test_config_and_inputs_validated(tok):
    src = SyntheticShapes(num_samples=4)
    with pytest.raises(ValueError, match="token_buckets"):
        InputPipeline([src], tok, _cfg(token_buckets=[128, 64]), process_index=0, process_count=1)
    with pytest.raises(ValueError, match="on_bad_sample"):
        InputPipeline([src], tok, _cfg(on_bad_sample="ignore"), process_index=0, process_count=1)
    with pytest.raises(ValueError, match="empty"):
        InputPipeline([SyntheticShapes(num_samples=0)], tok, _cfg(), process_index=0, process_count=1)
    with pytest.raises(ValueError, match="sample rate"):
        InputPipeline([src], tok, _cfg(), sample_rates=[1, 2], process_index=0, process_count=1)
    with pytest.raises(ValueError, match="process_index"):
        InputPipeline([src], tok, _cfg(), process_index=2, process_count=2)


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(tok):
    def make(workers):
        return InputPipeline([SyntheticShapes(num_samples=20)], tok, _cfg(num_workers=workers),
                             process_index=0, process_count=1)

    _assert_same(_take(iter(make(1)), 3), _take(iter(make(0)), 3))


def test_groups_keep_each_conversation_in_its_images_block(tok):
    """groups=2: images 0-1 own slots 0-2, images 2-3 slots 3-5; overflow is dropped per block."""
    src = SyntheticShapes(num_samples=40, questions_per_image=3)
    grouped = InputPipeline([src], tok, _cfg(images_per_batch=4, conversations_per_batch=6, groups=2),
                            process_index=0, process_count=1)
    plain = InputPipeline([src], tok, _cfg(images_per_batch=4, conversations_per_batch=6),
                          process_index=0, process_count=1)
    block, starved = np.arange(6) // 3, []
    for b, u in zip(_take(iter(grouped), 6), _take(iter(plain), 6)):
        np.testing.assert_array_equal(b["pixels"], u["pixels"])  # the same images in the same rows
        assert (b["conv_image"] // 2 == block).all()  # padding rows too (their block's first image)
        for g in range(2):  # every block gets conversations about its own images
            assert b["conv_valid"][block == g].any()
        # its first slot is the first conversation of the block's first image, as packed without groups
        first = int(np.argmax(u["conv_image"] == 2))
        if u["conv_valid"][first] and u["conv_image"][first] == 2:
            np.testing.assert_array_equal(b["input_ids"][3], u["input_ids"][first])
        starved.append(not (u["conv_valid"] & (u["conv_image"] >= 2)).any())
    # without groups the first images may fill every slot and leave images 2-3 none; with groups never
    assert any(starved) and grouped.stats.dropped["batch_full"] > 0
    with pytest.raises(ValueError, match=r"groups \(4\) must divide images_per_batch \(2\)"):
        _cfg(groups=4).validate()
