"""A released-PixelLM `hf_model/` + OpenAI CLIP -> pixellm-jax checkpoint -> PixelLM release layout.

The source is official-layout: sharded `torch.save` files with an index, bf16 LLM and fp32 pixel
modules, `rotary_emb.inv_freq` buffers, unused SAM prompt-encoder parts and the 4.31 tokenizer files.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from pixellm_jax.convert.checkpoint import load_pretrained, model_params, param_shardings
from pixellm_jax.convert.converter import convert_checkpoint
from pixellm_jax.convert.errors import ConversionError
from pixellm_jax.convert.exporters import export_pixellm
from pixellm_jax.convert.importers import prepare_import
from pixellm_jax.convert.readers import CheckpointReader
from pixellm_jax.models.clip_positions import resize_position_table
from tests.convert import fixtures as fx


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    hf_model, module, state = fx.write_pixellm_release(root / "PixelLM-7B")
    clip = fx.write_clip(root / "clip")
    spec = prepare_import("auto", root / "PixelLM-7B", clip=clip, base="tiny")  # finds hf_model/ itself
    conversion = convert_checkpoint(spec, root / "converted")
    return dict(root=root, hf_model=hf_model, module=module, state=state, clip=clip, spec=spec,
                plan=conversion.plan, ckpt=conversion.output)


def test_config_is_inferred_from_the_source(release):
    cfg = release["spec"].config
    assert release["spec"].kind == "pixellm"
    assert cfg.model.text.vocab_size == fx.RELEASE_VOCAB  # from the tensors
    assert cfg.model.head.seg_token_ids == list(range(423, 429))  # from added_tokens.json
    assert (cfg.model.head.seg_token_num, cfg.model.head.scale_num) == (3, 2)
    assert (cfg.model.text.num_kv_heads, cfg.model.text.rms_norm_eps) == (2, 1e-6)
    assert (cfg.model.vision.pretrained_image_size, cfg.model.vision.image_size) == (42, fx.IMAGE_SIZE)


def test_every_key_is_accounted_for(release):
    plan, state = release["plan"], release["state"]
    report = json.loads((release["ckpt"] / "conversion.json").read_text())["plan"]
    loaded = {k.split(":", 1)[1] for keys in report["loaded"].values() for k in keys}
    kept = {e["key"] for e in report["kept"]}
    ignored = {e["key"] for e in report["ignored"]}
    release_keys = set(state)
    assert release_keys <= loaded | kept | ignored
    assert {k for k in release_keys & ignored} == {f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(2)}
    assert kept & release_keys == {k for k in release_keys if k.startswith("model.prompt_encoder.")
                                   and ("point" in k or "mask_downscaling" in k)}
    assert {e["key"] for e in report["ignored"] if e["key"].startswith("text_model.")}  # CLIP text tower
    assert set(plan.initialised) == {f"llm/layers/self_attn/{p}/lora_{f}" for p in ("q_proj", "v_proj") for f in "ab"}
    assert "model.layers.1.self_attn.q_proj.weight [64, 64] bfloat16 -> llm/layers/self_attn/q_proj/kernel[1] " \
           "(transpose)" in plan.mapping()


def test_position_table_is_built_the_official_way(release):
    pre = load_pretrained(release["ckpt"])
    clip = CheckpointReader(release["clip"])
    source = clip.read("vision_model.embeddings.position_embedding.weight")
    got = np.asarray(model_params(pre.model)["vision_tower/embeddings/position_embedding"])
    np.testing.assert_array_equal(got, resize_position_table(source, fx.GRID, "official"))
    added = (release["hf_model"] / "added_tokens.json").read_text()
    assert (pre.tokenizer_dir / "added_tokens.json").read_text() == added  # tokenizer files copied as they are


def test_pytorch_jax_pytorch_is_bit_exact(release, tmp_path):
    export = export_pixellm(release["ckpt"], tmp_path / "hf_model", max_shard_size="200KB")
    assert len(export.files) > 1
    index = json.loads((tmp_path / "hf_model" / "pytorch_model.bin.index.json").read_text())
    assert set(index["weight_map"].values()) == set(export.files)
    exported = CheckpointReader(tmp_path / "hf_model")
    state = release["state"]
    assert set(exported.keys()) == set(state)
    for key, tensor in state.items():
        ours, theirs = exported.read(key), fx.to_numpy(tensor)
        assert ours.dtype == theirs.dtype, key
        assert np.array_equal(ours.view(np.uint8), theirs.view(np.uint8)), key
    # the official module tree takes the export with strict=True
    import torch

    official = fx.OfficialPixelLM(seed=99)
    official.load_state_dict({k: torch.from_numpy(np.array(exported.read(k).astype(np.float32)))
                              for k in exported.keys()}, strict=True)
    config = json.loads((tmp_path / "hf_model" / "config.json").read_text())
    assert config["architectures"] == ["PixelLMForCausalLM"] and config["vocab_size"] == fx.RELEASE_VOCAB


def test_existing_output_is_kept_without_force(release):
    ckpt = release["ckpt"]
    before = sorted(p.name for p in ckpt.iterdir())
    with pytest.raises(ConversionError, match="already exists; pass --force"):
        convert_checkpoint(release["spec"], ckpt)
    assert sorted(p.name for p in ckpt.iterdir()) == before
    assert not list(ckpt.parent.glob(".converted.*"))


def test_check_compares_the_whole_model_with_pytorch(release):
    from pixellm_jax.convert.check import check_conversion

    report = check_conversion(release["ckpt"], release["plan"])
    assert report.passed, str(report)
    assert report.exact == len(release["plan"].loads) and not report.rounded and not report.differ
    names = {s.name for s in report.stages}
    assert {"image tokens", "LLM logits", "[SEG] embeddings", "low-resolution mask logits",
            "final mask logits"} <= names
    assert all(s.max_abs_diff <= 1e-5 for s in report.stages), str(report)
    assert report.mask_pixels > 0 and report.sign_flips == 0


def test_mesh_conversion_places_every_tensor(release, tmp_path):
    """On 8 simulated devices each parameter is built in its logical-axis sharding, written, and restored so."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 4, 2), ("data", "fsdp", "tensor"))
    convert_checkpoint(release["spec"], tmp_path / "sharded", mesh=mesh)
    params = model_params(load_pretrained(tmp_path / "sharded", mesh=mesh).model)
    expected = param_shardings(release["spec"].config.model, mesh)
    reference = model_params(load_pretrained(release["ckpt"]).model)
    for path, value in params.items():
        assert value.sharding.is_equivalent_to(expected[path], value.ndim), path
        np.testing.assert_array_equal(np.asarray(value), np.asarray(reference[path]), err_msg=path)
    q = params["llm/layers/self_attn/q_proj/kernel"]  # [layers, embed -> fsdp, heads -> tensor]
    assert q.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (2, 16, 32)
    clip_fc1 = params["vision_tower/encoder/layers/0/mlp/fc1/kernel"]
    assert clip_fc1.sharding.spec == PartitionSpec("fsdp", "tensor")
    assert params["mask_decoder/iou_token/embedding"].sharding.spec == PartitionSpec(None, None)
