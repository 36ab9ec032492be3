"""The multi-scale pixel decoder against a PyTorch reference built from segment-anything parts.

The reference glue follows PIXELLM.md §1.8.2 / §11.7 and the official `predict_masks` loop: targets
are decoded image by image, level l > 0 upsamples its own neck features with `upsample_2x` (l times),
gates them with sigmoid(mask token 0's map of level l-1) + 1, uses `pe1` and the bilinearly resized
dense prompt; the levels' maps are resized to the last level's size and summed with weights γ.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

from pixellm_jax.config import load_config
from pixellm_jax.models.pixel_decoder import FeatureNeck, MultiScaleMaskDecoder, PromptEncoder
from tests import sam_reference as ref

TOL = 1e-5
IN_DIM = 64  # LLM hidden size feeding the neck


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


class RefPromptEncoder(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.pe_layer = ref.PositionEmbeddingRandom(dim // 2)
        self.no_mask_embed = nn.Embedding(1, dim)


class RefMaskDecoder(nn.Module):
    def __init__(self, head):
        super().__init__()
        dim, levels, tokens = head.out_dim, head.scale_num, head.num_mask_tokens
        self.transformer = nn.ModuleList(
            ref.TwoWayTransformer(
                depth=head.decoder_depth, embedding_dim=dim, num_heads=head.decoder_heads,
                mlp_dim=head.decoder_mlp_dim, attention_downsample_rate=head.attention_downsample,
            )
            for _ in range(levels)
        )
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(tokens, dim)
        self.level_embed = nn.Embedding(levels, dim)
        def upscaling(cout):
            return nn.Sequential(nn.ConvTranspose2d(dim, cout, 2, 2), ref.LayerNorm2d(cout), nn.GELU())

        self.output_upscaling = upscaling(dim // 8)
        if levels > 1:
            self.upsample_2x = upscaling(dim)
            self.pe1 = ref.PositionEmbeddingRandom(dim // 2)
        self.output_hypernetworks_mlps = nn.ModuleList(ref.MLP(dim, dim, dim // 8, 3) for _ in range(tokens))
        self.iou_prediction_head = ref.MLP(dim, dim, tokens, 3)
        if head.scale_fusion == "paper":
            self.scale_logits = nn.Parameter(torch.zeros(levels))  # redrawn by the test
        self.levels, self.fusion, self.tokens = levels, head.scale_fusion, tokens

    def predict_masks(self, level, image_embeddings, image_pe, sparse, dense, previous_masks):
        """One level for the n targets of one image; mask token 0's map [n, 1, H, W]."""
        n = sparse.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], 0)[None].expand(n, -1, -1)
        tokens = torch.cat([output_tokens, sparse], 1) + self.level_embed.weight[level]
        src = torch.repeat_interleave(image_embeddings, n, 0)
        if level > 0:
            for _ in range(level):
                src = self.upsample_2x(src)
            b, c, h, w = src.shape
            prev = torch.mean(previous_masks, dim=1)
            src = (torch.repeat_interleave(prev[:, None], c, 1).sigmoid() + 1) * src
            image_pe = self.pe1((h, w))[None]
            dense = F.interpolate(dense, size=(h, w), mode="bilinear", align_corners=False)
        src = src + dense
        pos = torch.repeat_interleave(image_pe, n, 0)
        b, c, h, w = src.shape
        hs, src = self.transformer[level](src, pos, tokens)
        mask_tokens_out = hs[:, 1 : 1 + self.tokens]
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper = torch.stack([self.output_hypernetworks_mlps[i](mask_tokens_out[:, i]) for i in range(self.tokens)], 1)
        b, c, h, w = upscaled.shape
        masks = (hyper @ upscaled.reshape(b, c, h * w)).reshape(b, self.tokens, h, w)
        return masks[:, 0:1]

    def gamma(self):
        if self.fusion == "paper":
            return torch.softmax(self.scale_logits, 0)
        return [1.0 / self.levels] * self.levels


class RefPixelDecoder(nn.Module):
    """`model.image_feature_neck`, `model.prompt_encoder`, `model.mask_decoder` and the level loop."""

    def __init__(self, head):
        super().__init__()
        dim = head.out_dim
        self.image_feature_neck = nn.Sequential(
            nn.Conv2d(IN_DIM, dim, 1, bias=False), ref.LayerNorm2d(dim),
            nn.Conv2d(dim, dim, 3, padding=1, bias=False), ref.LayerNorm2d(dim),
        )
        self.prompt_encoder = RefPromptEncoder(dim)
        self.mask_decoder = RefMaskDecoder(head)

    def forward(self, features, prompts, image_index):
        """features: L maps [n_img, IN_DIM, h, w]; prompts [n, L, dim] -> logits [n, H, W] in target order."""
        dec, levels = self.mask_decoder, self.mask_decoder.levels
        size = tuple(s * 2**levels for s in features[0].shape[2:])
        out = torch.zeros(prompts.shape[0], *size)
        gamma = dec.gamma()
        for i in range(features[0].shape[0]):
            idx = torch.nonzero(image_index == i)[:, 0]
            emb = self.image_feature_neck(torch.stack([f[i] for f in features]))  # [L, dim, h, w]
            sparse = prompts[idx]
            n, (h, w) = len(idx), emb.shape[2:]
            dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, h, w)
            low = torch.zeros(n, 1, *size)
            masks = None
            for l in range(levels):
                masks = dec.predict_masks(
                    l, emb[l : l + 1], self.prompt_encoder.pe_layer((h, w))[None], sparse[:, l : l + 1], dense, masks
                )
                low = low + gamma[l] * F.interpolate(masks, size, mode="bilinear", align_corners=False)
            out = out.index_put((idx,), low[:, 0])
        return out


def _head(**overrides):
    return dataclasses.replace(load_config("tiny").model.head, **overrides)


_BUILT = {}


def _build(head):
    """A redrawn PyTorch reference and our three modules holding the same weights (cached per config)."""
    key = (head.scale_num, head.scale_fusion, head.decoder_depth)
    if key in _BUILT:
        return _BUILT[key]
    theirs = ref.redraw_(RefPixelDecoder(head), seed=0)
    with torch.no_grad():  # logits of a few units, so that the level-1 gating matters
        for p in theirs.mask_decoder.output_hypernetworks_mlps.parameters():
            p.mul_(2)
    dim = head.out_dim
    neck = ref.abstract(lambda: FeatureNeck(IN_DIM, dim, rngs=nnx.Rngs(0)))
    prompt = ref.abstract(lambda: PromptEncoder(dim, rngs=nnx.Rngs(0)))
    decoder = ref.abstract(lambda: MultiScaleMaskDecoder(head, rngs=nnx.Rngs(0)))
    ref.copy_into(theirs.image_feature_neck, neck)
    ref.copy_into(theirs.prompt_encoder, prompt)
    ref.copy_into(theirs.mask_decoder, decoder)
    _BUILT[key] = theirs, neck, prompt, decoder
    return _BUILT[key]


def _inputs(levels, n_img=2, image_index=(0, 0, 1), grid=(4, 4), dim=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    features = [torch.randn(n_img, IN_DIM, *grid, generator=g) for _ in range(levels)]
    prompts = torch.randn(len(image_index), levels, dim, generator=g)
    return features, prompts, torch.tensor(image_index)


def _jax(features, prompts, image_index):
    index = jnp.asarray(image_index.numpy(), jnp.int32)
    return [jnp.asarray(ref.nhwc(f)) for f in features], jnp.asarray(prompts.numpy()), index


def _forward(decoder, neck, prompt, features, prompts, image_index):
    return decoder([neck(f) for f in features], prompts, image_index, prompt, return_levels=True)


# one jitted function for every call, so that equal shapes compile once
_decode = nnx.jit(_forward)


def _ours(neck, prompt, decoder, features, prompts, image_index):
    """(logits, per-level logits) of neck + decoder on the torch inputs."""
    return _decode(decoder, neck, prompt, *_jax(features, prompts, image_index))


def test_neck_matches_reference():
    theirs, neck, _, _ = _build(_head())
    x = torch.randn(2, IN_DIM, 3, 5, generator=torch.Generator().manual_seed(3))
    got = ref.run(neck, jnp.asarray(ref.nhwc(x)))
    assert got.shape == (2, 3, 5, 32)
    assert _max_diff(got, ref.nhwc(theirs.image_feature_neck(x))) <= TOL


def test_official_decoder_matches_reference():
    """L=2, 4x4 grid, 2 images with targets [0, 0, 1]."""
    theirs, neck, prompt, decoder = _build(_head())
    features, prompts, image_index = _inputs(2)
    with torch.no_grad():
        expected = theirs(features, prompts, image_index)
    logits, levels = _ours(neck, prompt, decoder, features, prompts, image_index)
    assert logits.shape == (3, 16, 16) and [m.shape for m in levels] == [(3, 8, 8), (3, 16, 16)]
    assert _max_diff(logits, expected) <= TOL
    assert float(np.abs(expected).max()) > 1  # not a trivially small output
    np.testing.assert_array_equal(decoder.scale_weights(), [0.5, 0.5])
    assert not hasattr(decoder, "scale_logits")  # official γ is not a parameter


@pytest.mark.parametrize("levels", [1, 3])
def test_other_level_counts_match_reference(levels):
    """The generalisation to L levels (one transformer layer per level, to keep compilation short)."""
    theirs, neck, prompt, decoder = _build(_head(scale_num=levels, decoder_depth=1))
    features, prompts, image_index = _inputs(levels, image_index=(1, 0))
    with torch.no_grad():
        expected = theirs(features, prompts, image_index)
    logits, _ = _ours(neck, prompt, decoder, features, prompts, image_index)
    assert logits.shape == (2, 4 * 2**levels, 4 * 2**levels)
    assert _max_diff(logits, expected) <= TOL


def test_paper_scale_fusion_matches_reference_and_trains():
    theirs, neck, prompt, decoder = _build(_head(scale_fusion="paper"))
    gamma = np.asarray(decoder.scale_weights())
    assert abs(gamma.sum() - 1) < 1e-6 and abs(gamma[0] - 0.5) > 1e-3  # redrawn, normalised
    features, prompts, image_index = _inputs(2)
    weight = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(5))
    expected = theirs(features, prompts, image_index)
    (expected * weight).sum().backward()

    def loss(decoder, neck, prompt, *args):
        logits, _ = _forward(decoder, neck, prompt, *args)
        return jnp.sum(logits * jnp.asarray(weight.numpy())), logits

    # differentiate with respect to γ only: the backward pass then skips the transformers
    wrt = nnx.DiffState(0, nnx.PathContains("scale_logits"))
    (_, logits), grads = nnx.jit(nnx.value_and_grad(loss, argnums=wrt, has_aux=True))(
        decoder, neck, prompt, *_jax(features, prompts, image_index)
    )
    assert _max_diff(logits, expected.detach()) <= TOL
    grad = np.asarray(grads["scale_logits"][...])
    assert np.all(np.abs(grad) > 1e-3)
    np.testing.assert_allclose(grad, theirs.mask_decoder.scale_logits.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_batched_targets_equal_per_image_calls():
    _, neck, prompt, decoder = _build(_head())
    features, prompts, image_index = _inputs(2)
    batched, _ = _ours(neck, prompt, decoder, features, prompts, image_index)
    # both per-image calls have the same shapes (one image, two targets): one compilation
    first, _ = _ours(neck, prompt, decoder, [f[:1] for f in features], prompts[:2], torch.tensor([0, 0]))
    second, _ = _ours(neck, prompt, decoder, [f[1:] for f in features], prompts[[2, 2]], torch.tensor([0, 0]))
    assert _max_diff(batched[:2], first) <= TOL
    assert _max_diff(batched[2], second[0]) <= TOL
    assert _max_diff(batched[0], batched[1]) > 1e-2  # different prompts give different masks


def test_padding_rows_stay_finite():
    """A padded target may carry any image index (clipped into range); real rows are unaffected."""
    _, neck, prompt, decoder = _build(_head())
    features, prompts, _ = _inputs(2)
    real, _ = _ours(neck, prompt, decoder, features, prompts, torch.tensor([0, 0, 1]))
    padded, _ = _ours(neck, prompt, decoder, features, prompts, torch.tensor([0, 0, 7]))
    assert np.all(np.isfinite(np.asarray(padded)))
    assert _max_diff(real[:2], padded[:2]) == 0
