"""Mask post-processing against torch `F.interpolate` done the official way, image by image."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from pixellm_jax.postprocess import postprocess_masks


def _official(logits: np.ndarray, resized_hw, original_hw, image_size: int) -> np.ndarray:
    """PixelLM `postprocess_masks` for one mask: resize to S×S, crop [:h', :w'], resize to H×W."""
    x = torch.tensor(np.array(logits, np.float32))[None, None]
    x = F.interpolate(x, (image_size, image_size), mode="bilinear", align_corners=False)
    x = x[..., : resized_hw[0], : resized_hw[1]]
    x = F.interpolate(x, tuple(original_hw), mode="bilinear", align_corners=False)
    return x[0, 0].numpy()


def _check(logits, resized, original, out_hw, image_size, got, valid):
    got, valid = np.asarray(got), np.asarray(valid)
    assert got.shape == (len(logits), *out_hw) and got.dtype == np.float32
    for i in range(len(logits)):
        h, w = original[i]
        ref = _official(np.asarray(logits[i], np.float32), resized[i], original[i], image_size)
        np.testing.assert_allclose(got[i, :h, :w], ref, atol=1e-5, rtol=0)
        assert valid[i, :h, :w].all() and not valid[i, h:].any() and not valid[i, :, w:].any()
        assert not got[i, h:].any() and not got[i, :, w:].any()


def test_mixed_sizes_match_torch_and_trace_once():
    s = 56
    rng = np.random.default_rng(0)
    traces = []

    @jax.jit
    def run(logits, resized, original):
        traces.append(1)
        return postprocess_masks(logits, resized, original, (64, 72), image_size=s)

    batches = [
        # up- and downscaling, tall, wide, square, degenerate 1-pixel side
        (np.array([[56, 40], [30, 56], [56, 56]]), np.array([[64, 46], [27, 50], [13, 13]])),
        (np.array([[56, 2], [20, 56], [56, 56]]), np.array([[60, 1], [19, 72], [64, 64]])),
    ]
    for resized, original in batches:
        logits = (4.0 * rng.normal(size=(3, 16, 16))).astype(np.float32)
        got, valid = run(logits, resized, original)
        _check(logits, resized, original, (64, 72), s, got, valid)
    assert len(traces) == 1


def test_default_size_bf16_input():
    # Realistic sizes: one-ulp differences in the source coordinate would show here (~1e-4).
    rng = np.random.default_rng(1)
    logits = (5.0 * rng.normal(size=(2, 128, 128))).astype(np.float32)
    resized, original = np.array([[448, 299], [336, 448]]), np.array([[1000, 667], [480, 640]])
    got, valid = jax.jit(postprocess_masks, static_argnums=(3, 4))(
        jnp.asarray(logits, jnp.bfloat16), resized, original, (1000, 667), 448)
    bf = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
    _check(bf, resized, original, (1000, 667), 448, got, valid)
