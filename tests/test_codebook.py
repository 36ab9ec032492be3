"""Codebook tokens on a real tokenizer, vocabulary growth, seg-state gathering and token fusion."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoTokenizer

from pixellm_jax.config import HeadConfig
from pixellm_jax.models.codebook import gather_seg_states, resize_vocab_rows
from pixellm_jax.models.token_fusion import TextHiddenFcs, TokenFusion
from pixellm_jax.tokens import add_codebook_tokens, codebook_ids_from_tokenizer, seg_token_strings
from tests.tiny_tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


# ------------------------------------------------------------------------------------------------
# tokens


def test_seg_token_strings():
    assert seg_token_strings(3, 2) == [f"[SEG{i}]" for i in range(6)]
    assert seg_token_strings(1, 1) == ["[SEG]"]
    assert seg_token_strings(2, 3)[-1] == "[SEG5]"
    with pytest.raises(ValueError):
        seg_token_strings(0, 2)


def test_add_codebook_tokens_real_tokenizer(tokenizer_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    base = len(tok)
    with pytest.raises(ValueError, match=r"\[SEG0\]"):
        codebook_ids_from_tokenizer(tok, 3, 2)
    ids = add_codebook_tokens(tok, 3, 2)
    assert ids == list(range(base, base + 6))
    assert all(not tok.added_tokens_decoder[i].special for i in ids)
    # Each token encodes to its own id inside text.
    enc = tok("Sure, [SEG0] [SEG1] [SEG2] [SEG3] [SEG4] [SEG5].", add_special_tokens=False).input_ids
    assert [i for i in enc if i >= base] == ids
    # Adding again is idempotent; a saved and reloaded tokenizer gives the same ids.
    assert add_codebook_tokens(tok, 3, 2) == ids
    tok.save_pretrained(tmp_path / "ext")
    again = AutoTokenizer.from_pretrained(tmp_path / "ext")
    assert codebook_ids_from_tokenizer(again, 3, 2) == ids
    # A different codebook shape is missing its tokens.
    with pytest.raises(ValueError, match=r"\[SEG6\]"):
        codebook_ids_from_tokenizer(again, 4, 2)


def test_single_token_codebook(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    (seg,) = add_codebook_tokens(tok, 1, 1)
    assert tok.convert_ids_to_tokens(seg) == "[SEG]"
    assert seg == len(tok) - 1


def test_resize_vocab_rows():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(10, 64)).astype(np.float32)
    head = rng.normal(size=(64, 10)).astype(np.float32)
    resize = jax.jit(resize_vocab_rows, static_argnums=2)
    new_emb, new_head = map(np.asarray, resize(emb, head, 16, jax.random.key(3)))
    assert new_emb.shape == (16, 64) and new_head.shape == (64, 16)
    np.testing.assert_array_equal(new_emb[:10], emb)
    np.testing.assert_array_equal(new_head[:, :10], head)
    for block in (new_emb[10:], new_head[:, 10:]):
        assert 0.015 < block.std() < 0.025 and abs(block.mean()) < 0.005
    assert not np.allclose(new_emb[10:], new_head[:, 10:].T)
    bf_emb, _ = resize(emb.astype(jnp.bfloat16), head, 12, jax.random.key(3))
    assert bf_emb.dtype == jnp.bfloat16
    with pytest.raises(ValueError):
        resize_vocab_rows(emb, head, 8, jax.random.key(3))
    with pytest.raises(ValueError):
        resize_vocab_rows(emb, head.T, 12, jax.random.key(3))


# ------------------------------------------------------------------------------------------------
# gathering

SEG = [100, 101, 102, 103, 104, 105]


def _reference_gather(hidden, ids, seg_ids, n, l, max_targets):
    """Plain per-row loop: states predicting each seg token, grouped in order (official rule)."""
    b, t, d = hidden.shape
    out = np.zeros((b, max_targets, l, n, d), np.float32)
    valid = np.zeros((b, max_targets), bool)
    num = np.zeros(b, int)
    for r in range(b):
        found = [hidden[r, p - 1] for p in range(1, t) if ids[r, p] in seg_ids]
        if len(found) % (n * l):
            continue
        num[r] = len(found) // (n * l)
        for k, state in enumerate(found[: max_targets * n * l]):
            tgt, lvl, slot = k // (n * l), (k // n) % l, k % n
            out[r, tgt, lvl, slot] = state
            valid[r, tgt] = True
    return out, valid, num


def _row(tokens, length):
    return tokens + [0] * (length - len(tokens))


def test_gather_hand_built_sequences():
    t = 40
    s = SEG
    rows = [
        # two targets, tokens interleaved with text, ids in non-canonical order (identity ignored)
        _row([1, 5, 6, s[0], s[1], s[2], s[3], s[4], s[5], 7, 8, s[5], s[4], s[3], 9, s[2], s[1], s[0], 2], t),
        # 7 seg tokens: malformed, no targets
        _row([1, 5] + s + [7, s[0], 2], t),
        # no seg token
        _row([1, 5, 6, 7, 2], t),
        # three targets but max_targets = 2: overflow, first two kept
        _row([1] + s + [9] + s + [9] + s + [2], t),
        # seg token at position 0 has no predicting state and is not counted
        _row([s[0], 5] + s + [2], t),
    ]
    ids = np.array(rows, np.int32)
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(len(rows), t, 8)).astype(np.float32)
    out = jax.jit(gather_seg_states, static_argnums=(2, 3, 4, 5))(hidden, ids, tuple(SEG), 3, 2, 2)
    ref, ref_valid, ref_num = _reference_gather(hidden, ids, SEG, 3, 2, 2)
    np.testing.assert_array_equal(out.states, ref)
    np.testing.assert_array_equal(out.valid, ref_valid)
    np.testing.assert_array_equal(out.num_targets, ref_num)
    np.testing.assert_array_equal(out.num_targets, [2, 0, 0, 3, 1])
    np.testing.assert_array_equal(out.malformed, [False, True, False, False, False])
    np.testing.assert_array_equal(out.overflow, [False, False, False, True, False])
    np.testing.assert_array_equal(out.question_id, np.repeat(np.arange(5)[:, None], 2, 1))
    # explicit positions: row 0 target 1 level 0 = tokens at 11, 12, 13 -> states 10, 11, 12
    np.testing.assert_array_equal(out.states[0, 1, 0], hidden[0, 10:13])
    np.testing.assert_array_equal(out.states[0, 1, 1], hidden[0, 14:17])
    assert out.states.shape == (5, 2, 2, 3, 8)


@pytest.mark.parametrize("n,l", [(2, 3), (1, 1), (4, 1)])
def test_gather_any_codebook_shape(n, l):
    rng = np.random.default_rng(n * 10 + l)
    b, t, g = 6, 48, n * l
    seg_ids = list(range(200, 200 + g))
    ids = rng.integers(3, 150, size=(b, t))
    counts = (0, g, 2 * g, g + 1 if g > 1 else 3 * g, 3 * g, 2)
    for r in range(b):
        k = counts[r]
        pos = rng.choice(np.arange(1, t), size=k, replace=False)
        ids[r, pos] = rng.choice(seg_ids, size=k)
    hidden = rng.normal(size=(b, t, 5)).astype(np.float32)
    fn = jax.jit(gather_seg_states, static_argnums=(2, 3, 4, 5))
    out = fn(jnp.asarray(hidden), jnp.asarray(ids), tuple(seg_ids), n, l, 2)
    ref, ref_valid, ref_num = _reference_gather(hidden, ids, seg_ids, n, l, 2)
    np.testing.assert_array_equal(out.states, ref)
    np.testing.assert_array_equal(out.valid, ref_valid)
    np.testing.assert_array_equal(out.num_targets, ref_num)
    np.testing.assert_array_equal(out.malformed, [c % g != 0 for c in counts])


def test_gather_jit_traces_once_and_differentiates():
    traces = []

    @jax.jit
    def f(hidden, ids):
        traces.append(1)
        out = gather_seg_states(hidden, ids, jnp.asarray(SEG), 3, 2, 3)
        return (out.states**2).sum(), out

    rng = np.random.default_rng(1)
    for k in range(3):
        ids = np.ones((2, 30), np.int32)
        ids[0, 3 : 3 + 6 * k] = np.tile(SEG, k)
        hidden = jnp.asarray(rng.normal(size=(2, 30, 4)), jnp.float32)
        _, out = f(hidden, jnp.asarray(ids))
        assert int(out.num_targets[0]) == k
    assert len(traces) == 1
    grad = jax.grad(lambda h: f(h, jnp.asarray(ids))[0])(hidden)
    np.testing.assert_allclose(grad[0, 2:14], 2 * hidden[0, 2:14])
    assert float(jnp.abs(grad[0, 14:]).sum()) == 0.0 and float(jnp.abs(grad[1]).sum()) == 0.0


# ------------------------------------------------------------------------------------------------
# projection and fusion


def test_text_hidden_fcs_matches_torch():
    torch.manual_seed(0)
    nn = torch.nn
    ref = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8), nn.Dropout(0.0))
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.1)
    ours = TextHiddenFcs(16, 8, rngs=nnx.Rngs(0))
    ours.fc1.kernel.value = jnp.asarray(ref[0].weight.detach().numpy().T)
    ours.fc1.bias.value = jnp.asarray(ref[0].bias.detach().numpy())
    ours.fc2.kernel.value = jnp.asarray(ref[2].weight.detach().numpy().T)
    ours.fc2.bias.value = jnp.asarray(ref[2].bias.detach().numpy())
    x = torch.randn(2, 5, 16)
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x.numpy()))), ref(x).detach().numpy(), atol=1e-5)
    axes = ours.fc1.kernel.get_metadata()["out_sharding"]
    assert axes == ("embed", "mlp")


def _torch_official_fusion(e: torch.Tensor, n: int, l: int) -> torch.Tensor:
    """Official arithmetic (PixelLM.py 455–461): acc = e0*0, then acc = acc + s_i * e_i per token."""
    scalars = [torch.nn.Parameter(torch.tensor(1.0 / (n * l))).to(e.dtype) for _ in range(n * l)]
    with torch.no_grad():
        acc = e[..., 0, :] * 0
        for i in range(n):
            acc = acc + scalars[i] * e[..., i, :]
    return acc


def test_official_fusion_fp32():
    head = HeadConfig(seg_token_num=3, scale_num=2, out_dim=16)
    fusion = TokenFusion(head, rngs=nnx.Rngs(0))
    assert len(nnx.state(fusion, nnx.Param)) == 0
    x = np.random.default_rng(0).normal(size=(4, 2, 3, 16)).astype(np.float32)
    out = np.asarray(fusion(jnp.asarray(x)))
    assert out.shape == (4, 2, 16)
    np.testing.assert_allclose(out, x.sum(axis=2) / 6, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(out, _torch_official_fusion(torch.from_numpy(x), 3, 2).numpy())
    # half the mean, not the mean
    assert not np.allclose(out, x.mean(axis=2), atol=1e-2)


def test_official_fusion_bf16_bit_exact():
    assert float(torch.tensor(1 / 6).to(torch.bfloat16)) == 0.1669921875
    head = HeadConfig(seg_token_num=3, scale_num=2, out_dim=32)
    fusion = TokenFusion(head, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = torch.randn(64, 2, 3, 32, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    expected = _torch_official_fusion(x, 3, 2).float().numpy()
    got = fusion(jnp.asarray(x.float().numpy()).astype(jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), expected)
    # Jitted as well (XLA may keep excess precision unless the rounding is explicit).
    got_jit = jax.jit(lambda a: fusion(a))(jnp.asarray(x.float().numpy()).astype(jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(got_jit.astype(jnp.float32)), expected)
    # A single fp32 sum times the rounded constant differs somewhere: the order matters.
    naive = (x.float().sum(dim=2) * 0.1669921875).to(torch.bfloat16).float().numpy()
    assert not np.array_equal(naive, expected)


def test_paper_fusion_shapes_init_and_grad():
    head = HeadConfig(seg_token_num=3, scale_num=2, out_dim=8, token_fusion="paper")
    fusion = TokenFusion(head, rngs=nnx.Rngs(0))
    assert fusion.phi.kernel.value.shape == (24, 8)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(5, 2, 2, 3, 8)), jnp.float32)
    out = fusion(x)
    assert out.shape == (5, 2, 2, 8)
    # starts at the official fusion
    np.testing.assert_allclose(out, x.sum(axis=3) / 6, rtol=1e-5, atol=1e-6)

    def loss(model, x):
        return (model(x) ** 2).sum()

    grads = nnx.grad(loss)(fusion, x)
    gk = grads["phi"]["kernel"].value
    assert gk.shape == (24, 8) and bool(jnp.all(jnp.isfinite(gk))) and float(jnp.abs(gk).sum()) > 0
    # one token's weights change the output: the projection really mixes the N states
    fusion.phi.kernel.value = fusion.phi.kernel.value.at[8:16].multiply(3.0)
    assert not np.allclose(fusion(x), out, atol=1e-3)
    with pytest.raises(ValueError):
        fusion(x[..., :2, :])
