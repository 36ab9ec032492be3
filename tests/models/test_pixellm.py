"""The whole PixelLM on the tiny config: forward, loss, gradients, jit once per shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixellm_jax.config import load_config
from pixellm_jax.models.lora import LoRAParam
from pixellm_jax.models.trainable import build_pixellm, trainable_filter
from pixellm_jax.objective import pixellm_objective
from pixellm_jax.tokens import IMAGE_TOKEN

# Decoder outputs the official model computes but never uses: their parameters get no gradient.
DEAD = ("iou_prediction_head", "output_hypernetworks_mlps/1", "output_hypernetworks_mlps/2",
        "output_hypernetworks_mlps/3")


def make_batch(cfg, seed=0, q=3, t=24, canvas=(20, 24)):
    """Two images, three conversations (image 0 has two), targets per conversation 1, 2, 0."""
    rng = np.random.default_rng(seed)
    mc = cfg.model
    s, m = mc.vision.image_size, mc.head.max_targets
    seg = list(mc.head.seg_ids(mc.text.vocab_size))
    ids = rng.integers(3, mc.text.vocab_size - len(seg), size=(q, t))
    ids[:, 0] = 1
    ids[:, 2] = IMAGE_TOKEN
    ids[0, 10:16] = seg
    ids[1, 8:14] = seg
    ids[1, 15:21] = seg
    attn = np.ones((q, t), bool)
    attn[2, 18:] = False
    labels = np.where(np.arange(t)[None] >= 6, ids, -100)
    labels[~attn] = -100
    labels[:, 2] = -100
    masks = np.zeros((q, m) + canvas, bool)
    masks[:, :2] = rng.random((q, 2) + canvas) < 0.3
    mask_valid = np.zeros((q, m), bool)
    mask_valid[0, 0] = mask_valid[1, :2] = True
    return dict(
        pixels=rng.normal(size=(2, s, s, 3)).astype(np.float32),
        resized_hw=np.array([[s, 40], [30, s]], np.int32),
        mask_hw=np.array([[20, 15], [12, 24]], np.int32),
        input_ids=ids.astype(np.int32), attention_mask=attn, labels=labels.astype(np.int32),
        conv_image=np.array([0, 0, 1], np.int32), conv_valid=np.ones(q, bool),
        masks=masks, mask_valid=mask_valid,
    )



@pytest.mark.parametrize("mode", ["official", "paper"])
def test_loss_and_gradients_reach_every_trainable_parameter(mode):
    overrides = [] if mode == "official" else [
        "mode=paper", "model.head.token_fusion=paper", "model.head.scale_fusion=paper",
        "model.head.train_prompt_encoder_and_neck=true", "loss.refinement=true",
    ]
    cfg = load_config("tiny", overrides)
    model = build_pixellm(cfg.model)
    for path, var in nnx.to_flat_state(nnx.state(model, LoRAParam)):
        if path[-1] == "lora_b":
            var.set_value(0.1 * jax.random.normal(jax.random.key(len(path)), var.get_value().shape))
    batch = jax.tree.map(jnp.asarray, make_batch(cfg))
    trainable = trainable_filter(cfg.model)

    @nnx.jit
    def grads(model, batch):
        def loss_fn(model):
            loss, metrics, _ = pixellm_objective(model, batch, cfg.loss)
            return loss, metrics

        return nnx.grad(loss_fn, argnums=nnx.DiffState(0, trainable), has_aux=True)(model)

    g, metrics = grads(model, batch)
    assert np.isfinite(float(metrics["total"])) and float(metrics["total"]) > 0
    assert int(metrics["num_masks"]) == 3 and int(metrics["seg_mismatch"]) == 0
    flat = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(g)}
    expected = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, trainable))}
    assert set(flat) == expected
    dead = {k for k in flat if any(d in k for d in DEAD)}
    zero = {k for k, v in flat.items() if not np.any(np.asarray(v))}
    assert zero == dead, sorted(zero ^ dead)
    roots = {k.split("/")[0] for k in flat}
    want = {"llm", "mm_projector", "out_mm_projector", "text_hidden_fcs", "mask_decoder"}
    if mode == "paper":
        want |= {"prompt_encoder", "image_feature_neck", "token_fusion"}
    assert roots == want
    # no CLIP and no LLaMA base weight is ever differentiated
    assert not any(k.startswith("vision_tower") or (k.startswith("llm/layers") and k.endswith("/kernel")) for k in flat)


def test_storage_dtypes_follow_the_partition():
    cfg = load_config("tiny", ["model.frozen_param_dtype=bfloat16"])
    model = nnx.eval_shape(lambda: build_pixellm(cfg.model))
    trainable = trainable_filter(cfg.model)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        want = jnp.float32 if trainable(path, var) else jnp.bfloat16
        assert var.get_value().dtype == want, path


def test_compiles_once_per_shape_and_masks_have_output_size():
    cfg = load_config("tiny")
    model = build_pixellm(cfg.model)
    traces = []

    @nnx.jit
    def forward(model, batch):
        traces.append(1)
        return pixellm_objective(model, batch, cfg.loss)[1:]

    for seed in range(3):  # new contents, same shapes
        metrics, out = forward(model, jax.tree.map(jnp.asarray, make_batch(cfg, seed)))
    assert len(traces) == 1
    grid = cfg.model.vision.grid
    assert out.mask_logits.shape == (3, cfg.model.head.max_targets, 4 * grid, 4 * grid)
    np.testing.assert_array_equal(out.seg.num_targets, [1, 2, 0])
