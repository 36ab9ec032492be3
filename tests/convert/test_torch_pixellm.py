"""The PyTorch pixel head built from the release's source tensors against the converted JAX model.

Every stage gets identical float32 inputs on both sides (the JAX model's own upstream outputs), so a
difference points at that stage: projector image tokens, neck features, fused codebook prompts,
low-resolution mask logits (per level and combined) and final masks at the original size. The
whole chain is also run end to end on each side.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from pixellm_jax.convert.checkpoint import load_pretrained
from pixellm_jax.convert.converter import convert_checkpoint
from pixellm_jax.convert.errors import ConversionError
from pixellm_jax.convert.importers import prepare_import
from pixellm_jax.convert.readers import CheckpointReader, to_torch
from pixellm_jax.convert.torch_pixellm import TorchPixelHead
from pixellm_jax.postprocess import postprocess_masks, target_masks
from tests.convert import fixtures as fx

TOL = 1e-5
RESIZED = np.array([[fx.IMAGE_SIZE, 40], [30, fx.IMAGE_SIZE]], np.int32)  # (h', w') per image
ORIGINAL = np.array([[28, 20], [45, 84]], np.int32)  # (H, W): one downscaled, one upscaled
CONV_IMAGE = np.array([0, 0, 1, 1], np.int32)
TARGETS = [1, 2, 1, 0]  # row 3 has 5 codebook tokens: malformed, no targets
HYPER_OUT = "model.mask_decoder.output_hypernetworks_mlps.0.layers.2"


def _diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _report(stage: str, ours, theirs) -> float:
    """Max |jax - torch| of a stage, printed (run with -s to see them all)."""
    d = _diff(ours, theirs)
    print(f"{stage}: max |jax - torch| = {d:.3g} (|values| <= {float(np.abs(np.asarray(ours)).max()):.3g})")
    return d


def _flips(a, b) -> int:
    """Pixels whose signs differ although one side is clearly away from zero."""
    a, b = np.asarray(a), np.asarray(b)
    return int(np.sum(((a > 0) != (b > 0)) & (np.maximum(np.abs(a), np.abs(b)) > TOL)))


def _nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("torch_head")
    hf_model, _, state = fx.write_pixellm_release(root / "PixelLM-7B")
    # Logits of a few units (the fixture's are ~0.04), so that 1e-5 is tight, the level-1 gating
    # matters and both signs occur: the source files are rewritten before converting.
    for leaf in ("weight", "bias"):
        state[f"{HYPER_OUT}.{leaf}"] = state[f"{HYPER_OUT}.{leaf}"] * 20
    fx.save_sharded_bin(hf_model, state)
    clip = fx.write_clip(root / "clip")
    spec = prepare_import("auto", root / "PixelLM-7B", clip=clip, base="tiny")
    ckpt = convert_checkpoint(spec, root / "converted").output
    pre = load_pretrained(ckpt, overrides=["model.dtype=float32", "model.lora.dropout=0.0"])
    cfg = pre.config.model
    reader = CheckpointReader(hf_model)  # the source tensors, as `convert --check` reads them
    state = {k: to_torch(reader.read(k)) for k in TorchPixelHead.source_keys(cfg)}
    head = TorchPixelHead.from_state(state, cfg)
    return dict(cfg=cfg, model=pre.model, head=head, seg=list(cfg.head.seg_ids(cfg.text.vocab_size)))


@pytest.fixture(scope="module")
def jax_side(setup):
    """Inputs and every JAX stage's outputs, each stage jitted once."""
    cfg, model, seg = setup["cfg"], setup["model"], setup["seg"]
    v = cfg.vision
    rng = np.random.default_rng(0)
    pixels = jnp.asarray(rng.normal(size=(2, v.image_size, v.image_size, 3)).astype(np.float32))
    encoded = nnx.jit(lambda m, p, r: m.encode_images(p, r))(model, pixels, jnp.asarray(RESIZED))

    q, t = len(TARGETS), 40
    ids = rng.integers(3, fx.PIECES, size=(q, t)).astype(np.int32)
    for row, n in enumerate(TARGETS):
        for k in range(n):
            ids[row, 6 + 7 * k: 12 + 7 * k] = seg
    ids[3, 10:15] = seg[:5]
    hidden = jnp.asarray(rng.normal(size=(q, t, cfg.text.hidden_size)).astype(np.float32))

    fused, gathered = nnx.jit(lambda m, x, i: m.seg_embeddings(x, i))(model, hidden, jnp.asarray(ids))
    flat = np.concatenate([np.asarray(fused[r, :n]) for r, n in enumerate(TARGETS)])
    image = np.concatenate([np.full(n, CONV_IMAGE[r], np.int32) for r, n in enumerate(TARGETS)])

    decoder = nnx.jit(lambda dec, pe, f, p, i: dec(f, p, i, pe, return_levels=True))
    low, levels = decoder(model.mask_decoder, model.prompt_encoder, encoded.decoder, jnp.asarray(flat),
                          jnp.asarray(image))
    out_hw = tuple(int(x) for x in ORIGINAL.max(0))
    post = jax.jit(postprocess_masks, static_argnums=(3, 4))
    final, valid = post(low, jnp.asarray(RESIZED[image]), jnp.asarray(ORIGINAL[image]), out_hw, v.image_size)

    @nnx.jit
    def whole(m, im, hidden, ids, conv):  # the production chain: decode_masks -> target_masks
        masks, _ = m.decode_masks(im, hidden, ids, conv)
        return masks, target_masks(masks, jnp.asarray(RESIZED), jnp.asarray(ORIGINAL), conv, out_hw, v.image_size)[0]

    chain_low, chain_final = whole(model, encoded, hidden, jnp.asarray(ids), jnp.asarray(CONV_IMAGE))
    arrays = dict(feats=encoded.vision, encoded=encoded, hidden=hidden, fused=fused, counts=gathered.num_targets,
                  low=low, levels=levels, final=final, valid=valid, chain_low=chain_low, chain_final=chain_final)
    return dict(jax.tree.map(np.array, arrays), ids=ids, flat=flat, image=image)


def test_image_tokens_and_decoder_features(setup, jax_side):
    head, encoded = setup["head"], jax_side["encoded"]
    torch_feats = [torch.from_numpy(f) for f in jax_side["feats"]]
    tokens = head.image_tokens(torch_feats[0]).numpy()
    assert tokens.shape == encoded.llm_tokens.shape
    assert _report("image tokens", encoded.llm_tokens, tokens) <= TOL
    neck = head.decoder_features(torch_feats)
    assert len(neck) == len(encoded.decoder) == 2
    for level, (ours, theirs) in enumerate(zip(encoded.decoder, neck)):
        assert _report(f"neck level {level}", ours.transpose(0, 3, 1, 2), theirs.numpy()) <= TOL


def test_fused_seg_embeddings(setup, jax_side):
    fused = jax_side["fused"]
    theirs = setup["head"].seg_embeddings(torch.from_numpy(jax_side["hidden"]), torch.from_numpy(jax_side["ids"]),
                                          setup["seg"])
    assert [len(x) for x in theirs] == list(jax_side["counts"]) == TARGETS
    for row, n in enumerate(TARGETS):
        assert theirs[row].shape == (n, 2, setup["cfg"].head.out_dim)
    ours = np.concatenate([fused[r, :n] for r, n in enumerate(TARGETS)])
    assert _report("fused seg embeddings", ours, torch.cat(theirs).numpy()) <= TOL
    assert np.abs(ours).max() > 0.1  # not a trivially small signal


def test_low_res_masks(setup, jax_side):
    head, image, low = setup["head"], jax_side["image"], jax_side["low"]
    decoder = [_nchw(f) for f in jax_side["encoded"].decoder]
    for i in range(2):
        idx = np.nonzero(image == i)[0]
        theirs, theirs_levels = head.low_res_masks([f[i] for f in decoder], torch.from_numpy(jax_side["flat"][idx]),
                                                   return_levels=True)
        for level, (ours, t) in enumerate(zip(jax_side["levels"], theirs_levels)):
            assert _report(f"level {level} logits, image {i}", ours[idx], t.numpy()) <= TOL
        assert tuple(theirs.shape) == (len(idx), *low.shape[1:])
        assert _report(f"low-res logits, image {i}", low[idx], theirs.numpy()) <= TOL
        assert _flips(low[idx], theirs.numpy()) == 0
    assert low.max() > 0.5 and low.min() < -0.5  # both signs present: a flip could show


def test_final_masks(setup, jax_side):
    head, image, final, valid = setup["head"], jax_side["image"], jax_side["final"], jax_side["valid"]
    for k, i in enumerate(image):
        h, w = ORIGINAL[i]
        theirs = head.final_masks(torch.from_numpy(jax_side["low"][k: k + 1]), RESIZED[i], ORIGINAL[i]).numpy()[0]
        assert theirs.shape == (h, w) and valid[k, :h, :w].all() and valid[k].sum() == h * w
        assert _report(f"final masks, target {k}", final[k, :h, :w], theirs) <= TOL
        assert _flips(final[k, :h, :w], theirs) == 0
        assert (final[k] > 0).any() and (final[k] < 0).any()


def test_whole_head_end_to_end(setup, jax_side):
    """Each side's own chain: CLIP features -> neck, LLM states -> prompts -> masks -> original size."""
    head = setup["head"]
    neck = head.decoder_features([torch.from_numpy(f) for f in jax_side["feats"]])
    prompts = head.seg_embeddings(torch.from_numpy(jax_side["hidden"]), torch.from_numpy(jax_side["ids"]),
                                  setup["seg"])
    for row, n in enumerate(TARGETS):
        if not n:
            continue
        i = CONV_IMAGE[row]
        low = head.low_res_masks([f[i] for f in neck], prompts[row])
        assert _report(f"chain low-res, row {row}", jax_side["chain_low"][row, :n], low.numpy()) <= TOL
        final = head.final_masks(low, RESIZED[i], ORIGINAL[i]).numpy()
        h, w = ORIGINAL[i]
        ours = jax_side["chain_final"][row, :n, :h, :w]
        assert _report(f"chain final, row {row}", ours, final) <= TOL
        assert _flips(ours, final) == 0


def test_missing_or_misshapen_tensor_is_named(setup):
    cfg = setup["cfg"]
    state = {"model." + k: torch.zeros(v.shape) for k, v in setup["head"].state_dict().items()}
    del state["model.mask_decoder.level_embed.weight"]
    with pytest.raises(ConversionError, match="level_embed"):
        TorchPixelHead.from_state(state, cfg)
    state["model.mask_decoder.level_embed.weight"] = torch.zeros(3, cfg.head.out_dim)
    with pytest.raises(ConversionError, match=r"level_embed.weight: shape \[3, 32\]"):
        TorchPixelHead.from_state(state, cfg)
