"""Which parameters a run trains, and their dtype."""

import jax
import jax.numpy as jnp

from pixellm_jax.config import MeshConfig, load_config
from pixellm_jax.mesh import make_mesh
from pixellm_jax.train.optimizer import make_optimizer
from pixellm_jax.train.state import state_layout
from tests.train.conftest import SMALL


def _trained(overrides):
    cfg = load_config("demo", [*SMALL, *overrides])
    layout = state_layout(cfg, make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1]), make_optimizer(cfg.optim))
    return layout.abstract_state.params, layout.abstract_frozen


def test_all_trains_everything_but_clip_unless_the_tower_is_trainable():
    params, frozen = _trained(["train.trainable=all", "model.vision.trainable=false", "model.frozen_param_dtype=bfloat16"])
    assert "vision_tower" not in params and "vision_tower" in frozen
    assert {"llm", "mask_decoder", "text_hidden_fcs", "image_feature_neck"} <= set(params)
    # trained weights are float32 even where the storage dtype of frozen weights is bf16
    assert params["llm"]["layers"]["self_attn"]["q_proj"]["kernel"].get_value().dtype == jnp.float32
    assert frozen["vision_tower"]["embeddings"]["patch_embedding"]["kernel"].get_value().dtype == jnp.bfloat16
    params, frozen = _trained(["train.trainable=all", "model.vision.trainable=true"])
    assert "vision_tower" in params and "vision_tower" not in frozen


def test_the_official_set_keeps_clip_and_the_llm_body_frozen():
    params, frozen = _trained(["model.vision.trainable=false"])
    assert "vision_tower" in frozen and "text_hidden_fcs" in params and "mask_decoder" in params
    layers = params["llm"]["layers"]["self_attn"]
    assert set(layers["q_proj"]) == {"lora_a", "lora_b"}  # the LLM body stays frozen
    assert "kernel" in frozen["llm"]["layers"]["self_attn"]["q_proj"]


def test_the_demo_trains_the_official_set_and_the_tower():
    params, frozen = _trained([])
    assert "vision_tower" in params and "vision_tower" not in frozen
    attention = params["llm"]["layers"]["self_attn"]
    assert "kernel" in frozen["llm"]["layers"]["self_attn"]["q_proj"]  # the LLM body stays frozen
    assert {name for name in attention if set(attention[name]) == {"lora_a", "lora_b"}} == {"q_proj", "k_proj", "v_proj"}
    assert "o_proj" not in attention and "mlp" not in params["llm"]["layers"]


def test_describe_counts_what_the_run_trains():
    from pixellm_jax.describe import parameter_table

    rows = {name: (n, trained) for name, n, trained, _ in parameter_table(load_config("demo", SMALL))}
    assert rows["vision_tower"][1] == rows["vision_tower"][0] > 0  # the demo trains its tower
    assert rows["llm.layers"][1] == 0 and rows["llm.lora"][1] == rows["llm.lora"][0] > 0
    frozen_tower = {name: trained for name, _, trained, _ in
                    parameter_table(load_config("demo", [*SMALL, "model.vision.trainable=false"]))}
    assert frozen_tower["vision_tower"] == 0
