"""KV-cache generation equals greedy decoding by full recomputation, token for token, masks included."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixellm_jax.eval.generate import SamplingConfig, generate, select_tokens
from pixellm_jax.eval.recompute import generate_by_recomputation
from pixellm_jax.models.trainable import build_pixellm
from pixellm_jax.tokens import IMAGE_TOKEN
from tests.eval.tiny import chain_answers, random_model, tiny_config, tiny_tokenizer

EOS, PAD, MAX_NEW = 2, 0, 12
A, B, C, D, X, Y, P = 100, 101, 102, 103, 104, 105, 106

jit_generate = nnx.jit(generate, static_argnames=("eos_id", "pad_id", "sampling"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    hf, seg = tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    cfg = tiny_config(hf, seg)
    return cfg, seg


def prompts(cfg, last):
    """Four right-padded prompt rows over two images, each ending in its own token `last[i]`."""
    rng = np.random.default_rng(1)
    lengths = [14, 9, 11, 6]
    t = 16
    ids = rng.integers(3, 90, size=(4, t)).astype(np.int32)
    ids[:, 0], ids[:, 2] = 1, IMAGE_TOKEN
    mask = np.arange(t)[None] < np.array(lengths)[:, None]
    ids[np.arange(4), np.array(lengths) - 1] = last
    ids = np.where(mask, ids, PAD)
    s = cfg.model.vision.image_size
    pixels = rng.normal(size=(2, s, s, 3)).astype(np.float32)
    resized = np.array([[s, 40], [30, s]], np.int32)
    return pixels, resized, ids, mask, np.array([0, 1, 1, 0], np.int32)


def both(model, inputs):
    cached = jit_generate(model, *inputs, eos_id=EOS, pad_id=PAD, sampling=SamplingConfig(max_new_tokens=MAX_NEW))
    full = generate_by_recomputation(model, *inputs, eos_id=EOS, pad_id=PAD, max_new_tokens=MAX_NEW)
    np.testing.assert_array_equal(np.asarray(cached.tokens), np.asarray(full.tokens))
    np.testing.assert_array_equal(np.asarray(cached.lengths), np.asarray(full.lengths))
    for name in ("valid", "num_targets", "malformed", "overflow"):
        np.testing.assert_array_equal(np.asarray(getattr(cached.seg, name)), np.asarray(getattr(full.seg, name)))
    return cached, full


@pytest.mark.slow
def test_chained_answers_with_masks(setup):
    cfg, seg = setup
    s0, s3 = seg[0], seg[3]
    chain = {A: X, X: s0, **{seg[i]: seg[i + 1] for i in range(5)}, seg[5]: P, P: EOS, B: s0, C: Y, Y: EOS, D: s3}
    model = random_model(cfg, seed=0)
    chain_answers(model, chain)
    cached, full = both(model, prompts(cfg, [A, B, C, D]))
    expected = [[X, *seg, P, EOS], [*seg, P, EOS], [Y, EOS], [*seg[3:], P, EOS]]
    tokens = np.asarray(cached.tokens)
    for row, exp in enumerate(expected):
        assert tokens[row, : len(exp)].tolist() == exp
        assert (tokens[row, len(exp):] == PAD).all()  # finished rows emit padding
    assert np.asarray(cached.lengths).tolist() == [len(e) for e in expected]
    assert np.asarray(cached.seg.num_targets).tolist() == [1, 1, 0, 0]
    assert np.asarray(cached.seg.malformed).tolist() == [False, False, False, True]  # 3 codebook tokens
    valid = np.asarray(cached.seg.valid)
    a, b = np.asarray(cached.mask_logits)[valid], np.asarray(full.mask_logits)[valid]
    assert np.abs(b).max() > 0.1
    np.testing.assert_allclose(a, b, atol=1e-5)
    # the two answers share their tokens but not their context: the masks differ
    assert np.abs(a[0] - a[1]).max() > 1e-3


@pytest.mark.slow
def test_context_dependent_greedy_tokens(setup):
    cfg, _ = setup
    model = random_model(cfg, seed=1)
    model.llm.lm_head.kernel.set_value(model.llm.lm_head.kernel[...] * 4)
    cached, _ = both(model, prompts(cfg, [A, B, C, D]))
    tokens = np.asarray(cached.tokens)
    assert len(np.unique(tokens)) > 8  # not one repeated token
    assert len({tuple(r) for r in tokens.tolist()}) == 4


@pytest.mark.slow
def test_scanned_layers_generate_the_same(setup):
    cfg, _ = setup
    model = random_model(cfg, seed=1)
    model.llm.lm_head.kernel.set_value(model.llm.lm_head.kernel[...] * 4)
    text = dataclasses.replace(cfg.model.text, scan_layers=True)
    scan_cfg = dataclasses.replace(cfg.model, text=text)
    scanned = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: build_pixellm(scan_cfg))), nnx.state(model))
    inputs = prompts(cfg, [A, B, C, D])
    sampling = SamplingConfig(max_new_tokens=MAX_NEW)
    loop = jit_generate(model, *inputs, eos_id=EOS, pad_id=PAD, sampling=sampling)
    scan = jit_generate(scanned, *inputs, eos_id=EOS, pad_id=PAD, sampling=sampling)
    np.testing.assert_array_equal(np.asarray(scan.tokens), np.asarray(loop.tokens))
    np.testing.assert_allclose(np.asarray(scan.mask_logits), np.asarray(loop.mask_logits), atol=1e-5)


def test_nucleus_sampling():
    logits = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1]] * 2000))
    top_half = SamplingConfig(temperature=1.0, top_p=0.5)
    draws = np.asarray(select_tokens(logits, jax.random.key(0), top_half))
    assert set(draws.tolist()) == {0, 1}  # 0.4 + 0.3 covers 0.5; the rest is cut
    assert abs((draws == 0).mean() - 4 / 7) < 0.05
    full = np.asarray(select_tokens(logits, jax.random.key(0), SamplingConfig(temperature=1.0)))
    assert set(full.tolist()) == {0, 1, 2, 3}
    np.testing.assert_array_equal(draws, np.asarray(select_tokens(logits, jax.random.key(0), top_half)))
    greedy = np.asarray(select_tokens(logits, jax.random.key(1), SamplingConfig(temperature=1.0, top_p=1e-6)))
    assert (greedy == 0).all()


def test_greedy_tokens_equal_argmax_with_ties_and_nans():
    from pixellm_jax.eval.generate import greedy_tokens

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 1000)).astype(np.float32)
    logits[1, [3, 700]] = 9.0  # a tie: the first one
    logits[2, [5, 600]] = np.nan  # NaNs: the first NaN
    logits[3] = -np.inf
    logits[4, 999] = np.inf
    logits[5] = np.round(logits[5])  # many ties
    expected = np.asarray(jnp.argmax(jnp.asarray(logits), axis=-1))
    assert expected[1] == 3 and expected[2] == 5 and expected[3] == 0 and expected[4] == 999
    np.testing.assert_array_equal(np.asarray(jax.jit(greedy_tokens)(jnp.asarray(logits))), expected)
    assert greedy_tokens(jnp.asarray(logits)).dtype == jnp.int32
