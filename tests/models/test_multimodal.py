"""Image-token splicing and patch pooling on hand-built inputs."""

import jax
import numpy as np
import torch

from pixellm_jax.models.multimodal import splice_image_tokens
from pixellm_jax.tokens import IGNORE_INDEX, IMAGE_TOKEN
from pixellm_jax.models.projector import pool_patches


def _reference_splice(emb, ids, mask, img, img_mask, labels):
    """Row-by-row concatenation, as LLaVA's prepare_inputs_labels_for_multimodal does."""
    out_e, out_m, out_l, out_i = [], [], [], []
    for r in range(ids.shape[0]):
        p = int(np.where(ids[r] == IMAGE_TOKEN)[0][0])
        out_e.append(np.concatenate([emb[r, :p], img[r], emb[r, p + 1:]]))
        out_m.append(np.concatenate([mask[r, :p], img_mask[r], mask[r, p + 1:]]))
        out_l.append(np.concatenate([labels[r, :p], np.full(img.shape[1], IGNORE_INDEX), labels[r, p + 1:]]))
        out_i.append(np.concatenate([ids[r, :p], np.full(img.shape[1], IMAGE_TOKEN), ids[r, p + 1:]]))
    return [np.stack(x) for x in (out_e, out_m, out_l, out_i)]


def test_splice_matches_rowwise_concatenation():
    rng = np.random.default_rng(0)
    b, t, n, h = 3, 7, 4, 5
    ids = rng.integers(1, 50, size=(b, t))
    ids[0, 1] = IMAGE_TOKEN
    ids[1, 0] = IMAGE_TOKEN
    ids[2, 6] = IMAGE_TOKEN  # at the very end
    mask = np.ones((b, t), bool)
    mask[1, 5:] = False  # right padding
    labels = np.where(rng.random((b, t)) < 0.5, IGNORE_INDEX, ids)
    emb = rng.normal(size=(b, t, h)).astype(np.float32)
    img = rng.normal(size=(b, n, h)).astype(np.float32)
    img_mask = rng.random((b, n)) < 0.7
    out = jax.jit(splice_image_tokens)(emb, ids, mask, img, img_mask, labels)
    ref_e, ref_m, ref_l, ref_i = _reference_splice(emb, ids, mask, img, img_mask, labels)
    np.testing.assert_array_equal(np.asarray(out.embeds), ref_e)
    np.testing.assert_array_equal(np.asarray(out.attention_mask), ref_m)
    np.testing.assert_array_equal(np.asarray(out.labels), ref_l)
    np.testing.assert_array_equal(np.asarray(out.token_ids), ref_i)
    np.testing.assert_array_equal(np.asarray(out.image_start), [1, 0, 6])


def test_pooling_equals_official_bilinear_resize():
    """PixelLM resizes 32x32 -> 16x16 bilinearly (align_corners False): exactly 2x2 average pooling."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 8 * 8, 6)).astype(np.float32)
    ours = np.asarray(pool_patches(x, 8, 4))
    t = torch.from_numpy(x).permute(0, 2, 1).reshape(2, 6, 8, 8)
    ref = torch.nn.functional.interpolate(t, size=(4, 4), mode="bilinear", align_corners=False)
    ref = ref.flatten(2).permute(0, 2, 1).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    assert pool_patches(x, 8, 8) is x
