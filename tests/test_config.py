"""Config loading: YAML -> typed dataclasses, overrides, and errors that name the key."""

import re
from pathlib import Path

import pytest

from pixellm_jax.config import (
    CONFIG_DIR,
    Config,
    ConfigError,
    dump_config,
    load_config,
    resolve_config_path,
    resolve_paths,
)


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_shipped_config_loads(name):
    cfg = load_config(name)
    assert isinstance(cfg, Config)
    assert cfg.name == name
    # a dump reloads to the same config
    assert load_config(name) == cfg and dump_config(cfg)


def test_official_values():
    c7 = load_config("pixellm_7b")
    t = c7.model.text
    assert (t.hidden_size, t.intermediate_size, t.num_layers, t.num_heads, t.vocab_size) == (4096, 11008, 32, 32, 32009)
    assert t.rms_norm_eps == 1e-6
    assert c7.model.vision.feature_layers == [-2, -11] and c7.model.vision.image_size == 448
    assert (c7.model.head.seg_token_num, c7.model.head.scale_num) == (3, 2)
    assert (c7.optim.learning_rate, c7.optim.b2, c7.optim.grad_accum_steps) == (3e-4, 0.95, 10)
    assert c7.data.sample_rates == [2.0, 9.0, 2.0, 4.0]
    c13 = load_config("pixellm_13b")
    assert (c13.model.text.hidden_size, c13.model.text.num_layers, c13.model.text.rms_norm_eps) == (5120, 40, 1e-5)
    # inherited from the 7B base
    assert c13.model.vision == c7.model.vision and c13.optim == c7.optim
    paper = load_config("pixellm_7b_paper")
    assert paper.mode == "paper" and paper.model.head.token_fusion == "paper" and paper.loss.refinement


def test_overrides_are_typed():
    cfg = load_config("tiny", ["model.text.num_layers=3", "optim.learning_rate=1e-3", "model.lora.targets=[q_proj]"])
    assert cfg.model.text.num_layers == 3
    assert cfg.optim.learning_rate == 1e-3
    assert cfg.model.lora.targets == ["q_proj"]


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.text.num_layer=3", "model.text.num_layer"),  # unknown key
        ("model.nope.x=1", "model.nope"),  # unknown section
        ("model.text.num_layers=two", "model.text.num_layers"),  # wrong type
        ("model.text.num_layers=2.5", "model.text.num_layers"),
        ("model.lora.enabled=1", "model.lora.enabled"),
        ("model.head.token_fusion=learned", "model.head.token_fusion"),  # not a choice
        ("model.text.num_kv_heads=3", "model.text.num_kv_heads"),  # impossible combination
        ("model.vision.feature_layers=[-2,-30]", "model.vision.feature_layers[1]"),
        ("model.head.token_fusion=paper", "model.head.token_fusion"),  # paper fusion in official mode
        ("loss.refinement=true", "loss.refinement"),
        ("data.sample_rates=[1,2]", "data.sample_rates"),
        ("mesh.fsdp=-1", None),  # valid: control case
        ("mesh.data=-1", "mesh"),  # two -1 axes
        ("model.text", "model.text"),  # no '='
    ],
)
def test_bad_values_name_the_key(override, key):
    if key is None:
        load_config("tiny", [override])
        return
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])
    assert key in str(e.value)


def test_bad_files(tmp_path):
    (tmp_path / "a.yaml").write_text("model:\n  text: [1, 2\n")
    with pytest.raises(ConfigError, match="a.yaml.*not valid YAML"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "b.yaml").write_text("base: c.yaml\n")
    (tmp_path / "c.yaml").write_text("base: b.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "b.yaml")
    (tmp_path / "d.yaml").write_text(f"base: {CONFIG_DIR / 'tiny.yaml'}\nmodel:\n  text:\n    hidden_size: 96\n")
    assert load_config(tmp_path / "d.yaml").model.text.hidden_size == 96


def test_resolve_paths(tmp_path, monkeypatch):
    cfg = load_config("demo", [
        "train.init_from=gs://bucket/base", f"train.tokenizer={tmp_path}/tok",
        'data.datasets=["muse:json=d/m.json,images=/coco", "synthetic"]', "data.sample_rates=[1.0, 1.0]",
        'data.val=["refcoco:root=ref,dataset=refcoco", "tfds:name=pixellm_records/muse,split=val,data_dir=gs://b/r"]',
    ])  # fmt: skip
    work = tmp_path / "work"
    r = resolve_paths(cfg, work)
    t = r.train
    assert (t.output_dir, t.compilation_cache, t.dataset_dir) == (
        str(work / "runs/demo"), str(work / "runs/.xla_cache"), str(work / "dataset"))
    assert (t.init_from, t.tokenizer) == ("gs://bucket/base", f"{tmp_path}/tok")
    assert r.data.datasets == [f"muse:json={work}/d/m.json,images=/coco", "synthetic"]
    assert r.data.val == [f"refcoco:root={work}/ref,dataset=refcoco", cfg.data.val[1]]
    assert (r.model, r.optim, r.data.sample_rates) == (cfg.model, cfg.optim, cfg.data.sample_rates)
    assert resolve_paths(r, tmp_path / "elsewhere") == r
    assert resolve_paths(load_config("demo", ["train.compilation_cache=''"]), work).train.compilation_cache == ""
    monkeypatch.chdir(tmp_path)
    assert resolve_paths(cfg).train.output_dir == str(Path.cwd() / "runs/demo")


def test_config_name_not_shadowed_by_a_folder(tmp_path, monkeypatch):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "demo.yaml").write_text("seed: 7\n")
    (tmp_path / "mine.yaml").write_text(f"base: {CONFIG_DIR / 'demo.yaml'}\nseed: 3\n")
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path("demo") == CONFIG_DIR / "demo.yaml"
    cfg = load_config("demo")
    assert cfg == load_config(CONFIG_DIR / "demo.yaml") and cfg.name == "demo" and cfg.seed == 0
    assert resolve_config_path("mine.yaml") == Path.cwd() / "mine.yaml"  # a file path is read from the cwd
    assert load_config("mine.yaml").seed == 3


@pytest.mark.parametrize(
    "override, key",
    [
        ('data.datasets=["nope"]', "data.datasets[0]: dataset 'nope': unknown kind"),
        ('data.datasets=["muse:json"]', "data.datasets[0]: dataset 'muse:json': expected key=value"),
        ('data.val=["synthetic", "muse:limit=0"]', "data.val[1]: dataset 'muse:limit=0': limit"),
        ('data.val=["refcoco:protocol=fast"]', "data.val[0]"),
        ("data.max_drop_fraction=1.5", "data.max_drop_fraction"),
        ("data.max_drop_fraction=-0.1", "data.max_drop_fraction"),
        ("data.max_drop_fraction=null", None),  # valid: control cases
        ("data.max_drop_fraction=1", None),
        ('data.val=["muse:json=v.json,protocol=teacher_forced"]', None),
    ],
)
def test_bad_data_values_name_the_key(override, key):
    if key is None:
        load_config("demo", [override])
        return
    with pytest.raises(ConfigError) as e:
        load_config("demo", [override])
    assert key in str(e.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.grad_clip=-1", "optim.grad_clip"),  # gradient ascent
        ("optim.grad_clip=0", "optim.grad_clip"),  # clip_by_global_norm(0) zeroes every gradient
        ("optim.grad_clip=.inf", "optim.grad_clip"),
        ("optim.learning_rate=.inf", "optim.learning_rate"),
        ("optim.learning_rate=.nan", "optim.learning_rate"),
        ("optim.learning_rate=0", "optim.learning_rate"),
        ("optim.weight_decay=-0.1", "optim.weight_decay"),
        ("optim.b1=1", "optim.b1"),
        ("optim.b2=-0.5", "optim.b2"),
        ("optim.warmup_steps=-1", "optim.warmup_steps"),
        ("optim.total_steps=0", "optim.total_steps"),
        ("data.sample_rates=[1, .inf, 1, 1]", "data.sample_rates[1]"),
        ("data.sample_rates=[.nan, 1, 1, 1]", "data.sample_rates[0]"),
        ("data.sample_rates=[0, 0, 0, 0]", "data.sample_rates"),  # nothing to sample
        ("data.num_classes_per_sample=0", "data.num_classes_per_sample"),
        ("data.num_classes_per_question=0", "data.num_classes_per_question"),
        ("data.worker_buffer_size=0", "data.worker_buffer_size"),
        ("data.read_threads=-1", "data.read_threads"),
        ("data.prefetch_buffer_size=-1", "data.prefetch_buffer_size"),
        ("data.mask_size=-56", "data.mask_size"),
        ("data.max_drop_fraction=.nan", "data.max_drop_fraction"),
        ("model.vision.layer_norm_eps=0", "model.vision.layer_norm_eps"),
        ("model.vision.layer_norm_eps=.inf", "model.vision.layer_norm_eps"),
        ("model.vision.pretrained_image_size=0", "model.vision.pretrained_image_size"),
        ("model.text.rms_norm_eps=-1e-6", "model.text.rms_norm_eps"),
        ("model.text.rope_theta=0", "model.text.rope_theta"),
        ("model.text.rope_theta=.inf", "model.text.rope_theta"),
        ("model.text.max_position_embeddings=0", "model.text.max_position_embeddings"),
        ("model.lora.alpha=0", "model.lora.alpha"),
        ("model.lora.alpha=.nan", "model.lora.alpha"),
        ("model.lora.dropout=1", "model.lora.dropout"),
        ("model.lora.dropout=-0.1", "model.lora.dropout"),
        ("model.head.out_dim=0", "model.head.out_dim"),
        ("model.head.decoder_depth=0", "model.head.decoder_depth"),
        ("model.head.decoder_heads=0", "model.head.decoder_heads"),  # not a ZeroDivisionError
        ("model.head.decoder_mlp_dim=0", "model.head.decoder_mlp_dim"),
        ("model.head.attention_downsample=0", "model.head.attention_downsample"),
        ("model.head.attention_downsample=64", "model.head.attention_downsample"),  # out_dim 32 -> 0 wide
        ("loss.ce_weight=-1", "loss.ce_weight"),
        ("loss.bce_weight=.inf", "loss.bce_weight"),
        ("loss.dice_weight=-0.5", "loss.dice_weight"),
        ("loss.refinement_weight=-2", "loss.refinement_weight"),
        ("loss.refinement_alpha=.inf", "loss.refinement_alpha"),
        ("loss={ce_weight: 0, bce_weight: 0, dice_weight: 0}", "loss"),
        ("train.peak_tflops=.inf", "train.peak_tflops"),
        ("train.peak_tflops=-1", "train.peak_tflops"),
        ("seed=-1", "seed"),
    ],
)
def test_numeric_domains_name_the_key(override, key, capsys):
    from pixellm_jax.cli import main

    assert main(["describe", "--config", "tiny", override]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and f"{key}:" in err, err
    with pytest.raises(ConfigError, match=re.escape(f"{key}:")):
        load_config("tiny", [override])


@pytest.mark.parametrize(
    "override",
    ["train.peak_tflops=0", "optim.weight_decay=0", "optim.b1=0", "data.sample_rates=[0, 0, 0, 0.5]",
     "loss={ce_weight: 0, bce_weight: 1, dice_weight: 0}", "model.lora={enabled: false, alpha: 0}",
     "data.read_threads=0", "data.prefetch_buffer_size=0", "seed=4294967295"],
)
def test_numeric_domain_boundaries_are_accepted(override):
    load_config("tiny", [override])
