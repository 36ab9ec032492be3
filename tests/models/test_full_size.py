"""Full-size 7B/13B models built abstractly (no memory); parameter counts from the reference tables.

The expected counts are derived independently from the state-dict key/shape tables of
reference/PIXELLM.md §7 (PixelLM release) and WEIGHT_FORMATS.md §1.4 (CLIP ViT-L/14), not from our
modules: every key's shape is written out and multiplied here.
"""

import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from pixellm_jax.config import load_config
from pixellm_jax.models.lora import LoRAParam
from pixellm_jax.models.sam_layers import Buffer
from pixellm_jax.models.trainable import build_pixellm, trainable_filter


def released_pixellm_keys(H, I, V, layers):
    """PixelLM-7B/13B release state dict (§7), without CLIP and without unused prompt-encoder keys."""
    keys = {"model.embed_tokens.weight": (V, H), "lm_head.weight": (V, H), "model.norm.weight": (H,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in "qkvo":
            keys[p + f"self_attn.{n}_proj.weight"] = (H, H)
        keys[p + "mlp.gate_proj.weight"] = (I, H)
        keys[p + "mlp.up_proj.weight"] = (I, H)
        keys[p + "mlp.down_proj.weight"] = (H, I)
        keys[p + "input_layernorm.weight"] = (H,)
        keys[p + "post_attention_layernorm.weight"] = (H,)
    for proj in ("mm_projector", "out_mm_projector"):
        keys.update({f"model.{proj}.0.weight": (2 * H, 1024), f"model.{proj}.0.bias": (2 * H,),
                     f"model.{proj}.2.weight": (H, 2 * H), f"model.{proj}.2.bias": (H,)})
    keys.update({"model.text_hidden_fcs.0.0.weight": (H, H), "model.text_hidden_fcs.0.0.bias": (H,),
                 "model.text_hidden_fcs.0.2.weight": (256, H), "model.text_hidden_fcs.0.2.bias": (256,)})
    keys.update({"model.image_feature_neck.0.weight": (256, H, 1, 1), "model.image_feature_neck.1.weight": (256,),
                 "model.image_feature_neck.1.bias": (256,), "model.image_feature_neck.2.weight": (256, 256, 3, 3),
                 "model.image_feature_neck.3.weight": (256,), "model.image_feature_neck.3.bias": (256,)})
    keys["model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = (2, 128)
    keys["model.prompt_encoder.no_mask_embed.weight"] = (1, 256)
    d = "model.mask_decoder."

    def attn(prefix, inner):
        for n in "qkv":
            keys[prefix + f"{n}_proj.weight"] = (inner, 256)
            keys[prefix + f"{n}_proj.bias"] = (inner,)
        keys[prefix + "out_proj.weight"] = (256, inner)
        keys[prefix + "out_proj.bias"] = (256,)

    for t in range(2):
        for i in range(2):
            p = f"{d}transformer.{t}.layers.{i}."
            attn(p + "self_attn.", 256)
            attn(p + "cross_attn_token_to_image.", 128)
            attn(p + "cross_attn_image_to_token.", 128)
            for n in range(1, 5):
                keys[p + f"norm{n}.weight"] = keys[p + f"norm{n}.bias"] = (256,)
            keys.update({p + "mlp.lin1.weight": (2048, 256), p + "mlp.lin1.bias": (2048,),
                         p + "mlp.lin2.weight": (256, 2048), p + "mlp.lin2.bias": (256,)})
        attn(f"{d}transformer.{t}.final_attn_token_to_image.", 128)
        keys[f"{d}transformer.{t}.norm_final_attn.weight"] = keys[f"{d}transformer.{t}.norm_final_attn.bias"] = (256,)
    keys.update({d + "iou_token.weight": (1, 256), d + "mask_tokens.weight": (4, 256), d + "level_embed.weight": (2, 256),
                 d + "pe1.positional_encoding_gaussian_matrix": (2, 128),
                 d + "output_upscaling.0.weight": (256, 32, 2, 2), d + "output_upscaling.0.bias": (32,),
                 d + "output_upscaling.1.weight": (32,), d + "output_upscaling.1.bias": (32,),
                 d + "upsample_2x.0.weight": (256, 256, 2, 2), d + "upsample_2x.0.bias": (256,),
                 d + "upsample_2x.1.weight": (256,), d + "upsample_2x.1.bias": (256,)})
    for k in range(4):
        for j, shape in enumerate([(256, 256), (256, 256), (32, 256)]):
            keys[f"{d}output_hypernetworks_mlps.{k}.layers.{j}.weight"] = shape
            keys[f"{d}output_hypernetworks_mlps.{k}.layers.{j}.bias"] = shape[:1]
    for j, shape in enumerate([(256, 256), (256, 256), (4, 256)]):
        keys[f"{d}iou_prediction_head.layers.{j}.weight"] = shape
        keys[f"{d}iou_prediction_head.layers.{j}.bias"] = shape[:1]
    return keys


def clip_vit_l_keys(positions):
    """openai/clip-vit-large-patch14 vision keys (WEIGHT_FORMATS §1.4), without post_layernorm."""
    D, F = 1024, 4096
    keys = {"embeddings.class_embedding": (D,), "embeddings.patch_embedding.weight": (D, 3, 14, 14),
            "embeddings.position_embedding.weight": (positions, D), "pre_layrnorm.weight": (D,), "pre_layrnorm.bias": (D,)}
    for i in range(24):
        p = f"encoder.layers.{i}."
        for n in ("q", "k", "v", "out"):
            keys[p + f"self_attn.{n}_proj.weight"] = (D, D)
            keys[p + f"self_attn.{n}_proj.bias"] = (D,)
        keys.update({p + "mlp.fc1.weight": (F, D), p + "mlp.fc1.bias": (F,), p + "mlp.fc2.weight": (D, F),
                     p + "mlp.fc2.bias": (D,)})
        for n in ("layer_norm1", "layer_norm2"):
            keys[p + n + ".weight"] = keys[p + n + ".bias"] = (D,)
    return keys


def count(keys):
    return sum(math.prod(s) for s in keys.values())


@pytest.mark.slow
@pytest.mark.parametrize("name, H, I, V, layers", [
    ("pixellm_7b", 4096, 11008, 32009, 32),
    ("pixellm_13b", 5120, 13824, 32008, 40),
])
def test_full_model_builds_abstractly_with_reference_counts(name, H, I, V, layers):
    cfg = load_config(name)
    model = nnx.eval_shape(lambda: build_pixellm(cfg.model))
    sizes = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, Buffer))):  # not RNG state
        assert isinstance(var.get_value(), jax.ShapeDtypeStruct)  # nothing allocated
        sizes[path] = (var, math.prod(var.get_value().shape))

    def total(pred):
        return sum(n for (p, (v, n)) in sizes.items() if pred(p, v))

    release = count(released_pixellm_keys(H, I, V, layers))
    clip = count(clip_vit_l_keys(1025))
    lora_expected = layers * 2 * (8 * H + H * 8)  # q_proj and v_proj, r = 8
    ours_lora = total(lambda p, v: isinstance(v, LoRAParam))
    ours_clip = total(lambda p, v: p[0] == "vision_tower")
    ours_rest = total(lambda p, v: p[0] != "vision_tower" and not isinstance(v, LoRAParam))
    assert ours_lora == lora_expected
    assert ours_clip == clip
    assert ours_rest == release
    # the official trainable set: LoRA, embeddings, lm_head, projectors, decoder, text_hidden_fcs
    trainable = trainable_filter(cfg.model)
    ours_trainable = total(lambda p, v: trainable(p, v))
    rel = released_pixellm_keys(H, I, V, layers)
    expected_trainable = lora_expected + count({k: s for k, s in rel.items() if any(
        t in k for t in ("embed_tokens", "lm_head", "mm_projector", "mask_decoder", "text_hidden_fcs"))
        and "positional_encoding_gaussian_matrix" not in k})
    assert ours_trainable == expected_trainable
    # frozen base weights are stored in bf16, trainable ones in fp32
    for p, (v, _) in sizes.items():
        if isinstance(v, nnx.Param):
            assert v.get_value().dtype == (jnp.float32 if trainable(p, v) else jnp.bfloat16), p
    assert any(isinstance(v, Buffer) for v, _ in sizes.values())


def test_every_parameter_has_logical_axes_with_a_rule():
    """Sharding never needs to touch the modules: every variable names its axes, each has a rule."""
    from pixellm_jax.sharding import LOGICAL_RULES

    for mode in ("pixellm_7b", "pixellm_7b_paper"):
        cfg = load_config(mode, ["model.text.num_layers=2", "model.vision.num_layers=12"])
        model = nnx.eval_shape(lambda: build_pixellm(cfg.model))
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, Buffer))):
            axes = var.get_metadata().get("out_sharding")
            assert axes is not None, path
            assert len(axes) == len(var.get_value().shape), (path, axes)
            assert all(a is None or a in LOGICAL_RULES for a in axes), (path, axes)
