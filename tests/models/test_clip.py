"""CLIP vision tower parity against transformers `CLIPVisionModel` (eager, fp32), position-table
constructions against torch `F.interpolate`, and the ViT / LLM padding-mask rules."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from transformers import CLIPVisionConfig, CLIPVisionModel

import jax.numpy as jnp

from pixellm_jax.config import VisionConfig
from pixellm_jax.models.clip import CLIPVisionTower, llm_token_mask, vit_patch_mask
from pixellm_jax.models.clip_positions import (
    interpolate_positions_hf,
    interpolate_positions_official,
    resize_position_table,
)

HIDDEN, INTER, LAYERS, HEADS, PATCH = 32, 64, 3, 4, 14
ALL_STATES = [0, 1, 2, 3]
TOL = 1e-5


def _hf_model(image_size: int = 42) -> CLIPVisionModel:
    """A tiny HF CLIP tower with weights redrawn large enough that a wrong layer shows."""
    cfg = CLIPVisionConfig(
        hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        image_size=image_size, patch_size=PATCH, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    model = CLIPVisionModel._from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layrnorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            elif "position_embedding" in name or "class_embedding" in name:
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model


def _vision_cfg(image_size: int, feature_layers=ALL_STATES) -> VisionConfig:
    return VisionConfig(
        hidden_size=HIDDEN, intermediate_size=INTER, num_layers=LAYERS, num_heads=HEADS, patch_size=PATCH,
        image_size=image_size, pretrained_image_size=42, layer_norm_eps=1e-5, feature_layers=list(feature_layers),
    )


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def load_torch_clip(tower: CLIPVisionTower, hf: CLIPVisionModel, position_table: np.ndarray | None = None) -> None:
    """Copy HF CLIP weights into the NNX tower (Linear [out,in] -> [in,out], conv OIHW -> HWIO)."""
    sd = {k: _np(v) for k, v in hf.state_dict().items()}
    emb = tower.embeddings
    emb.patch_embedding.kernel[...] = jnp.asarray(sd["embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0))
    emb.class_embedding[...] = jnp.asarray(sd["embeddings.class_embedding"])
    table = sd["embeddings.position_embedding.weight"] if position_table is None else position_table
    emb.position_embedding[...] = jnp.asarray(table)
    tower.pre_layrnorm.scale[...] = jnp.asarray(sd["pre_layrnorm.weight"])
    tower.pre_layrnorm.bias[...] = jnp.asarray(sd["pre_layrnorm.bias"])
    for i, layer in enumerate(tower.encoder.layers):
        pre = f"encoder.layers.{i}."
        for lin, name in [
            (layer.self_attn.q_proj, "self_attn.q_proj"), (layer.self_attn.k_proj, "self_attn.k_proj"),
            (layer.self_attn.v_proj, "self_attn.v_proj"), (layer.self_attn.out_proj, "self_attn.out_proj"),
            (layer.mlp.fc1, "mlp.fc1"), (layer.mlp.fc2, "mlp.fc2"),
        ]:
            lin.kernel[...] = jnp.asarray(sd[pre + name + ".weight"].T)
            lin.bias[...] = jnp.asarray(sd[pre + name + ".bias"])
        for ln, name in [(layer.layer_norm1, "layer_norm1"), (layer.layer_norm2, "layer_norm2")]:
            ln.scale[...] = jnp.asarray(sd[pre + name + ".weight"])
            ln.bias[...] = jnp.asarray(sd[pre + name + ".bias"])


def _pixels(size: int, batch: int = 2, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, 3, size, size)).astype(np.float32)


def _ours(cfg: VisionConfig, hf, pixels_nchw: np.ndarray, table=None, patch_mask=None) -> list[np.ndarray]:
    tower = CLIPVisionTower(cfg, rngs=nnx.Rngs(0))
    load_torch_clip(tower, hf, table)
    out = tower(jnp.asarray(pixels_nchw.transpose(0, 2, 3, 1)),
                None if patch_mask is None else jnp.asarray(patch_mask))
    return [np.asarray(o) for o in out]


def _hf_states(hf, pixels_nchw: np.ndarray, **kwargs) -> list[np.ndarray]:
    with torch.no_grad():
        out = hf(torch.from_numpy(pixels_nchw), output_hidden_states=True, **kwargs)
    return [_np(h) for h in out.hidden_states]


def _assert_states(ours, ref_states, layers):
    assert len(ours) == len(layers)
    for got, idx in zip(ours, layers):
        want = ref_states[idx][:, 1:]
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL, err_msg=f"hidden state {idx}")


def test_native_size_matches_hf():
    hf = _hf_model()
    pixels = _pixels(42)
    ref = _hf_states(hf, pixels)
    assert np.abs(ref[-1]).max() > 1.0  # weights large enough for a meaningful comparison
    _assert_states(_ours(_vision_cfg(42), hf, pixels), ref, ALL_STATES)
    # Negative indices count from the end of the 4 hidden states, in the order given.
    _assert_states(_ours(_vision_cfg(42, [-2, -3]), hf, pixels), ref, [2, 1])


def test_only_needed_layers_run():
    """With the deepest feature at state 2, the last layer is never used (NaN weights stay unseen); jitted."""
    hf = _hf_model()
    pixels = _pixels(42)
    tower = CLIPVisionTower(_vision_cfg(42, [-2, 0]), rngs=nnx.Rngs(0))
    load_torch_clip(tower, hf)
    last = tower.encoder.layers[LAYERS - 1].mlp.fc1
    last.kernel[...] = jnp.full_like(last.kernel[...], jnp.nan)
    out = nnx.jit(lambda model, x: model(x))(tower, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    _assert_states([np.asarray(o) for o in out], _hf_states(hf, pixels), [2, 0])


def test_interpolated_hf_table_matches_hf_interpolate_pos_encoding():
    hf = _hf_model()
    pixels = _pixels(56)
    table = interpolate_positions_hf(_np(hf.embeddings.position_embedding.weight), 4)
    assert table.shape == (17, HIDDEN)
    ref = _hf_states(hf, pixels, interpolate_pos_encoding=True)
    _assert_states(_ours(_vision_cfg(56), hf, pixels, table), ref, ALL_STATES)


def _torch_official_table(weight: torch.Tensor, new_grid: int) -> torch.Tensor:
    """PixelLM's construction (reference §1.2): last row as "cls", rows 0..g*g-1 as the grid."""
    n, d = weight.shape
    g = int((n - 1) ** 0.5)
    cls_like = weight[-1:]
    grid = weight[:-1].permute(1, 0).reshape(1, d, g, g)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bilinear", align_corners=False)
    return torch.cat([grid[0].flatten(-2).permute(1, 0), cls_like])


def _resize_hf_positions(hf: CLIPVisionModel, table: torch.Tensor, image_size: int) -> None:
    """Swap the HF embedding's position table for one built for `image_size`, as PixelLM's loader does."""
    emb = hf.embeddings
    emb.position_embedding = torch.nn.Embedding(table.shape[0], table.shape[1])
    with torch.no_grad():
        emb.position_embedding.weight.copy_(table)
    emb.image_size = image_size
    emb.num_patches = (image_size // PATCH) ** 2
    emb.num_positions = emb.num_patches + 1
    emb.position_ids = torch.arange(emb.num_positions)[None]


def test_official_table_matches_torch_construction():
    hf = _hf_model()
    pixels = _pixels(56)
    source = _np(hf.embeddings.position_embedding.weight).copy()
    table = interpolate_positions_official(source, 4)
    _resize_hf_positions(hf, _torch_official_table(torch.from_numpy(source), 4), 56)
    ref = _hf_states(hf, pixels)
    _assert_states(_ours(_vision_cfg(56), hf, pixels, table), ref, ALL_STATES)
    # The quirk itself: last output row is the source's last row; it differs from the HF table.
    np.testing.assert_array_equal(table[-1], source[-1])
    assert np.abs(table - interpolate_positions_hf(source, 4)).max() > 0.1


def test_padding_mask_matches_hf_additive_key_mask():
    hf = _hf_model()
    pixels = _pixels(42, batch=3)
    resized = jnp.asarray([[42, 42], [20, 42], [30, 10]])
    patch_mask = np.asarray(vit_patch_mask(resized, 3, PATCH))
    keys = np.concatenate([np.ones((3, 1), bool), patch_mask.reshape(3, -1)], axis=1)
    additive = torch.zeros(3, 1, 10, 10)
    additive.masked_fill_(torch.from_numpy(~keys)[:, None, None, :], torch.finfo(torch.float32).min)
    ref = _hf_states(hf, pixels, attention_mask=additive)
    unmasked = _hf_states(hf, pixels)
    assert np.abs(ref[-1][1:] - unmasked[-1][1:]).max() > 1e-2  # the mask matters for the padded samples
    _assert_states(_ours(_vision_cfg(42), hf, pixels, patch_mask=patch_mask), ref, ALL_STATES)
    _assert_states(_ours(_vision_cfg(42), hf, pixels, patch_mask=np.ones((3, 3, 3), bool)), unmasked, ALL_STATES)


def test_bad_shapes_raise():
    tower = CLIPVisionTower(_vision_cfg(42), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="NHWC"):
        tower(jnp.zeros((1, 3, 42, 42)))
    with pytest.raises(ValueError, match="patch_mask"):
        tower(jnp.zeros((1, 42, 42, 3)), jnp.ones((1, 4, 4), bool))
    with pytest.raises(ValueError, match="feature layer"):
        CLIPVisionTower(_vision_cfg(42, [4]), rngs=nnx.Rngs(0))


def test_mask_rules_hand_computed():
    hw = jnp.asarray([[100, 448], [448, 300], [448, 448]])
    vit = np.asarray(vit_patch_mask(hw, 32, 14))
    assert vit.shape == (3, 32, 32) and vit.dtype == bool
    assert vit[0].all(axis=1).sum() == 8 and not vit[0, 8:].any()  # 14*7 = 98 < 100 <= 14*8
    assert vit[1].all(axis=0).sum() == 22 and not vit[1, :, 22:].any()  # 14*21 = 294 < 300
    assert vit[2].all()
    llm = np.asarray(llm_token_mask(hw, 16, 448))
    assert llm.shape == (3, 256)
    grid = llm.reshape(3, 16, 16)
    assert grid[0].all(axis=1).sum() == 4 and not grid[0, 4:].any()  # 28*3 = 84 < 100 <= 28*4
    assert grid[1].all(axis=0).sum() == 11 and not grid[1, :, 11:].any()  # 28*10 = 280 < 300 <= 308
    assert llm[2].all()


def test_mask_rules_match_official_nearest_interpolation():
    """PixelLM: pixel mask 448x448 -> nearest 32x32 (ViT) -> nearest 16x16 (LLM)."""
    hw = np.asarray([[100, 448], [448, 300], [57, 13], [1, 448], [447, 420]])
    pix = torch.zeros(len(hw), 1, 448, 448)
    for b, (h, w) in enumerate(hw):
        pix[b, 0, :h, :w] = 1
    vit_ref = F.interpolate(pix, size=(32, 32), mode="nearest")
    llm_ref = F.interpolate(vit_ref, size=(16, 16), mode="nearest")
    np.testing.assert_array_equal(np.asarray(vit_patch_mask(jnp.asarray(hw), 32, 14)), _np(vit_ref[:, 0]) > 0)
    np.testing.assert_array_equal(np.asarray(llm_token_mask(jnp.asarray(hw), 16, 448)),
                                  _np(llm_ref[:, 0]).reshape(len(hw), -1) > 0)


@pytest.mark.parametrize("g,new", [(3, 4), (24, 32), (5, 3), (4, 4)])
def test_numpy_tables_match_torch_interpolate(g, new):
    source = np.random.default_rng(g * 100 + new).normal(size=(g * g + 1, 8)).astype(np.float32)
    w = torch.from_numpy(source)

    grid = w[1:].reshape(1, g, g, 8).permute(0, 3, 1, 2)
    bicubic = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    hf_ref = torch.cat([w[:1], bicubic.permute(0, 2, 3, 1).reshape(-1, 8)])
    hf_table = interpolate_positions_hf(source, new)
    assert hf_table.dtype == np.float32
    np.testing.assert_allclose(hf_table, _np(hf_ref), rtol=0, atol=1e-6)

    official = interpolate_positions_official(source, new)
    np.testing.assert_allclose(official, _np(_torch_official_table(w, new)), rtol=0, atol=1e-6)

    np.testing.assert_array_equal(resize_position_table(source, new, "hf"), hf_table)
    np.testing.assert_array_equal(resize_position_table(source, new, "official"), official)


def test_position_table_errors():
    with pytest.raises(ValueError, match="square grid"):
        interpolate_positions_hf(np.zeros((11, 4), np.float32), 4)
    with pytest.raises(ValueError, match="position_interpolation"):
        resize_position_table(np.zeros((10, 4), np.float32), 4, "bicubic")
