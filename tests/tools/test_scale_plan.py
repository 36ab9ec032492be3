"""The scale plan's ahead-of-time compile on the tiny config over the 8 simulated devices."""

import math

import pytest

from pixellm_jax.config import MeshConfig, load_config
from tests.tools._load import load_tool

scale_plan = load_tool("scale_plan")

# The tiny config, shallower, so that the one compile of this file stays short.
SMALL = ["model.vision.num_layers=2", "model.text.num_layers=1", "model.head.decoder_depth=1",
         "model.text.hidden_size=128", "model.text.intermediate_size=512", "model.text.remat=full"]


def test_recipes_cover_the_devices():
    for n in (8, 64, 256):
        for recipe in scale_plan.RECIPES:
            m = scale_plan.recipe_mesh(recipe, n)
            assert m.data * m.fsdp * m.tensor == n
    assert scale_plan.recipe_mesh("data_fsdp", 8) == MeshConfig(2, 4, 1)
    assert scale_plan.recipe_mesh("data_fsdp", 64) == MeshConfig(8, 8, 1)
    assert scale_plan.recipe_mesh("fsdp_tensor", 256) == MeshConfig(1, 64, 4)
    with pytest.raises(ValueError, match="unknown recipe"):
        scale_plan.recipe_mesh("pipeline", 8)


def test_workers_get_the_arguments_without_the_device_list():
    argv = ["--models", "pixellm_7b", "--devices", "8", "64", "--scan", "--remat", "full"]
    assert scale_plan._without(argv, "--devices") == ["--models", "pixellm_7b", "--scan", "--remat", "full"]
    assert scale_plan._without(argv, "--scan") == argv[:5] + ["--remat", "full"]


def test_tiny_step_compiles_sharded_with_sane_memory_and_flops():
    cfg = load_config("tiny", SMALL)
    row = scale_plan.plan_step(cfg, MeshConfig(1, 8, 1), images_per_group=2, convs_per_group=2, text_len=48,
                               compiler_options=scale_plan.FAST_CODEGEN)
    assert row["devices"] == 8 and row["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert row["images"] == 16 and row["conversations"] == 16  # two images and two conversations per device
    assert row["remat"] == "full"

    # The trainable parameters are float32 and FSDP-sharded: each device holds less than all of them,
    # at least an eighth; AdamW keeps two moments (and MultiSteps an accumulator) per parameter.
    full = 4 * row["trainable"]
    assert full / 8 <= row["trainable_bytes"] < full
    assert 2 * row["trainable_bytes"] <= row["optimizer_bytes"] <= 3 * row["trainable_bytes"] + 4096
    assert row["frozen_bytes"] > 0
    # XLA's arguments are the state, the frozen part and the batch; the donated state is aliased.
    held = row["trainable_bytes"] + row["optimizer_bytes"] + row["frozen_bytes"]
    assert held <= row["argument_bytes"] < held + 2**22
    assert 0 < row["alias_bytes"] <= row["output_bytes"]
    assert row["temp_bytes"] > 0
    assert row["peak_bytes"] >= row["argument_bytes"] + row["temp_bytes"]

    # Cost analysis counts every op of the step; the estimate only the matmuls of the LLM and CLIP
    # (not the pixel decoder, the mask resizing and the losses, which are large at this size).
    assert math.isfinite(row["flops_ratio"])
    assert 1.0 <= row["flops_ratio"] <= 10.0, row["flops_ratio"]
    assert row["flops_per_image"] == pytest.approx(row["flops_per_device"] * 8 / 16)

    line = scale_plan._table([dict(row, recipe="fsdp")])[2]
    assert line.startswith("| tiny | 8 | fsdp (1×8×1) | full | 16 / 16 |") and "nan" not in line


def test_extrapolation_is_affine_in_layers():
    keys = scale_plan._AFFINE + ("output_bytes",)
    shallow = dict({k: 10.0 for k in keys}, num_layers=2, lower_s=1.0, compile_s=2.0, alias_bytes=10.0)
    deep = dict({k: 14.0 for k in keys}, num_layers=4, lower_s=1.0, compile_s=3.0, alias_bytes=14.0)
    deep["estimate_per_image"] = 7.0
    shallow["estimate_per_image"] = 5.0
    row = scale_plan.extrapolate(shallow, deep, 32)
    assert row["num_layers"] == 32 and row["extrapolated_from"] == [2, 4]
    assert row["temp_bytes"] == 10.0 + 2.0 * 30  # +2 per layer
    assert row["estimate_per_image"] == 5.0 + 1.0 * 30
    assert row["flops_ratio"] == row["flops_per_image"] / row["estimate_per_image"]
    assert row["peak_bytes"] == row["argument_bytes"] + row["temp_bytes"]  # outputs all aliased
    assert row["compile_s"] == 5.0
