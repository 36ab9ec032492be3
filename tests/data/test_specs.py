"""Dataset specs: parsing, path resolution, the sources they open (official-layout defaults), and a
config's training sources and held-out splits built from them."""

import json
from pathlib import Path

import numpy as np
import pytest

from pixellm_jax.config import ConfigError, load_config
from pixellm_jax.data.dataset_io import DatasetFileError
from pixellm_jax.data.specs import (
    REFER_DATASETS,
    SpecContext,
    SpecError,
    absolute_spec,
    default_name,
    open_spec,
    parse_spec,
    protocol_of,
)
from pixellm_jax.train.data import training_sources, val_splits
from tests.data.test_muse import records, write_muse
from tests.data.test_refer import write_refer
from tests.data.test_semseg import label_with, write_image, write_label

RNG = np.random.default_rng(0)
MUSE_IMAGES = Path("refer_seg/images/mscoco/images")


def official_muse(dataset_dir):
    """MUSE in the official layout: muse_train.json (2 records), muse_val.json (1), COCO images."""
    write_muse(dataset_dir / MUSE_IMAGES.parent, records()).rename(dataset_dir / "muse_train.json")
    (dataset_dir / "muse_val.json").write_text(json.dumps(records()[:1]))


def write_refer_seg(root):
    """The four REFER datasets in their released layouts."""
    write_refer(root, dataset="refclef", image_dir="images/saiapr_tc-12")
    for dataset in ("refcoco", "refcoco+", "refcocog"):
        write_refer(root, dataset=dataset, split_by="umd" if dataset == "refcocog" else "unc")


def test_parse():
    s = parse_spec("refcocog_val=refer:dataset=refcocog,split=val,limit=5,protocol=generate")
    assert (s.name, s.kind, s.options, s.protocol, s.limit) == (
        "refcocog_val", "refer", {"dataset": "refcocog", "split": "val"}, "generate", 5)
    bare = parse_spec("muse")
    assert (bare.name, bare.kind, bare.options, bare.protocol, bare.limit) == ("", "muse", {}, None, None)
    # values are YAML scalars; anything else is kept as written
    assert parse_spec("synthetic:num_samples=5,min_visible=0.5").options == {"num_samples": 5, "min_visible": 0.5}
    options = parse_spec("muse:json=a: b.json,images=[coco,names=ade20k+cocostuff,root=@x,image_dir=null").options
    assert options == {"json": "a: b.json", "images": "[coco", "names": "ade20k+cocostuff", "root": "@x",
                       "image_dir": "null"}


@pytest.mark.parametrize("spec, problem", [
    ("nope", "unknown kind 'nope'"),
    ("val=nope:json=x", "unknown kind 'nope'"),
    ("muse:json", "expected key=value"),
    ("muse:protocol=fast", "protocol"),
    ("muse:limit=0", "limit"),
    ("muse:limit=2.5", "limit"),
    ("muse:limit=yes", "limit"),
    ("muse:limit=[3", "limit"),
])  # fmt: skip
def test_parse_errors_name_the_spec(spec, problem):
    with pytest.raises(SpecError) as e:
        parse_spec(spec)
    assert f"dataset {spec!r}" in str(e.value) and problem in str(e.value)


@pytest.mark.parametrize("spec, key", [
    ("synthetic:num_samples=5,colour=red", "colour"),
    ("muse:json=x.json,questions_per_image=2", "questions_per_image"),
    ("refcoco:root=r,captions=3", "captions"),
    ("tfds:name=pixellm_records/muse", "split, data_dir"),
])  # fmt: skip
def test_unknown_or_missing_keys_name_the_spec(spec, key, tmp_path):
    with pytest.raises(SpecError) as e:
        open_spec(spec, SpecContext(dataset_dir=tmp_path))
    assert f"dataset {spec!r}" in str(e.value) and key in str(e.value)


def test_absolute_spec(tmp_path, monkeypatch):
    spec = "v=muse:json=data/val.json,images=/abs/coco,limit=2"
    assert absolute_spec(spec, tmp_path) == f"v=muse:json={tmp_path}/data/val.json,images=/abs/coco,limit=2"
    refer = "refer:root=refer_seg,image_dir=imgs,dataset=refcoco,split=val"
    expected = f"refer:root={tmp_path}/refer_seg,image_dir={tmp_path}/imgs,dataset=refcoco,split=val"
    assert absolute_spec(refer, tmp_path) == expected
    tfds = "tfds:name=pixellm_records/muse,split=val,data_dir=records"
    assert absolute_spec(tfds, tmp_path) == f"tfds:name=pixellm_records/muse,split=val,data_dir={tmp_path}/records"
    for kept in ("tfds:name=pixellm_records/muse,split=val,data_dir=gs://bucket/records", "muse",
                 "sem_seg:names=ade20k+cocostuff", "synthetic:num_samples=5,seed=1"):
        assert absolute_spec(kept, tmp_path) == kept
    monkeypatch.chdir(tmp_path)
    assert absolute_spec("sem_seg:root=ds") == f"sem_seg:root={Path.cwd()}/ds"
    with pytest.raises(SpecError, match="unknown kind"):
        absolute_spec("nope:json=x.json", tmp_path)


def test_muse_official_layout(tmp_path):
    official_muse(tmp_path)
    (train,) = open_spec("muse", SpecContext(dataset_dir=tmp_path))
    assert len(train) == 2 and train.image_root == tmp_path / MUSE_IMAGES
    assert train.get(0, RNG).sample_id == "muse:COCO_train2014_000000000001.jpg"
    eval_ctx = SpecContext(dataset_dir=tmp_path, purpose="eval")
    spec = parse_spec("muse")
    (val,) = open_spec(spec, eval_ctx)
    assert len(val) == 1
    assert (default_name(spec, val, eval_ctx), protocol_of(spec, val)) == ("muse", "generate")
    forced = parse_spec("hard=muse:protocol=teacher_forced")
    assert (default_name(forced, val, eval_ctx), protocol_of(forced, val)) == ("hard", "teacher_forced")


@pytest.mark.parametrize("purpose, file", [("train", "muse_train.json"), ("eval", "muse_val.json")])
def test_missing_official_file_names_it(tmp_path, purpose, file):
    with pytest.raises(DatasetFileError) as e:
        open_spec("muse", SpecContext(dataset_dir=tmp_path, purpose=purpose))
    assert str(tmp_path / file) in str(e.value)


def test_muse_at_custom_place_and_limit(tmp_path):
    json_file = write_muse(tmp_path / "mine", records())
    spec = f"muse:json={json_file},images={tmp_path / 'mine/images'}"
    ctx = SpecContext(dataset_dir=tmp_path / "absent")
    (src,) = open_spec(spec, ctx)
    assert len(src) == 2 and src.get(1, RNG).sample_id == "muse:000000000002.jpg"
    (first,) = open_spec(spec + ",limit=1", ctx)
    assert len(first) == 1 and first.name == "muse"
    first.get(0, RNG)
    assert first.skipped_questions == 1  # the wrapped source's attributes show through
    with pytest.raises(IndexError):
        first.get(1, RNG)


def test_synthetic(tmp_path):
    ctx = SpecContext(dataset_dir=tmp_path, seed=4, synthetic_samples=7)
    (limited,) = open_spec("synthetic:num_samples=5,limit=3", ctx)
    assert len(limited) == 3
    assert len(open_spec("synthetic:limit=9", ctx)[0]) == 7  # a limit above the size keeps them all
    (default,) = open_spec("synthetic", ctx)
    assert (len(default), default.seed) == (7, 4)
    spec = parse_spec("synthetic")
    assert (default_name(spec, default, ctx), protocol_of(spec, default)) == ("synthetic", "generate")


def test_refer_kinds_and_modes(tmp_path):
    write_refer(tmp_path / "refer_seg")
    train_ctx, eval_ctx = SpecContext(dataset_dir=tmp_path), SpecContext(dataset_dir=tmp_path, purpose="eval")
    spec = parse_spec("refcoco")
    (train,) = open_spec(spec, train_ctx)
    assert (train.name, train.mode, len(train)) == ("refcoco", "train", 1)
    assert any("left cup" in c.turns[0][0] for c in train.get(0, RNG).conversations)  # the train split's refs
    assert default_name(spec, train, train_ctx) == "refcoco_train"
    (val,) = open_spec(spec, eval_ctx)
    assert val.mode == "val" and default_name(spec, val, eval_ctx) == "refcoco_val"
    (conv,) = val.get(0, RNG).conversations
    assert "big rug" in conv.turns[0][0]  # the val split's one ref
    assert protocol_of(spec, val) == "teacher_forced"
    multi = parse_spec("refer:dataset=refcoco,mode=val_multi")
    (src,) = open_spec(multi, eval_ctx)
    assert src.mode == "val_multi" and default_name(multi, src, eval_ctx) == "refcoco_val_multi"
    test = parse_spec(f"refer:root={tmp_path / 'refer_seg'},dataset=refcoco,split=testA,protocol=generate")
    (src,) = open_spec(test, SpecContext(dataset_dir=tmp_path / "absent", purpose="eval"))
    assert src.get(0, RNG).sample_id == "refcoco:b.jpg"
    assert (default_name(test, src, eval_ctx), protocol_of(test, src)) == ("refcoco_testA", "generate")


def test_refer_seg_group(tmp_path):
    root = tmp_path / "refer_seg"
    write_refer(root)
    with pytest.raises(DatasetFileError) as e:
        open_spec("refer_seg", SpecContext(dataset_dir=tmp_path))
    assert str(root / "refclef") in str(e.value)
    write_refer_seg(root)
    sources = open_spec("refer_seg:limit=1", SpecContext(dataset_dir=tmp_path))
    assert [s.name for s in sources] == list(REFER_DATASETS) and all(len(s) == 1 for s in sources)


def test_sem_seg_kinds(tmp_path):
    write_image(tmp_path / "ade20k/images/training/x.jpg")
    write_label(tmp_path / "ade20k/annotations/training/x.png", label_with([1, 5]))
    write_image(tmp_path / "coco/train2017/y.jpg")
    write_label(tmp_path / "cocostuff/train2017/y.png", label_with([1, 5]))
    ctx = SpecContext(dataset_dir=tmp_path)
    assert [s.name for s in open_spec("sem_seg:names=ade20k+cocostuff", ctx)] == ["ade20k", "cocostuff"]
    assert [s.name for s in open_spec("ade20k", ctx)] == ["ade20k"]
    assert len(open_spec(f"cocostuff:root={tmp_path}", SpecContext(dataset_dir=tmp_path / "absent"))[0]) == 1
    with pytest.raises(DatasetFileError, match="pascal_part"):  # the third of the five is missing
        open_spec("sem_seg", ctx)


def demo(tmp_path, *overrides):
    return load_config("demo", [f"train.dataset_dir={tmp_path}", *overrides])


def test_training_sources_split_a_group_rate(tmp_path):
    write_refer_seg(tmp_path / "refer_seg")
    cfg = demo(tmp_path, 'data.datasets=["refer_seg", "synthetic:num_samples=4", "muse"]',
               "data.sample_rates=[9.0, 1.0, 0]")  # rate 0: muse is never opened
    sources, rates = training_sources(cfg)
    assert [s.name for s in sources] == [*REFER_DATASETS, "synthetic"]
    assert rates == [2.25] * 4 + [1.0]
    with pytest.raises(ConfigError, match=r"data\.datasets\[1\]: dataset 'synthetic:colour=red'"):
        training_sources(demo(tmp_path, 'data.datasets=["synthetic", "synthetic:colour=red"]',
                              "data.sample_rates=[1.0, 1.0]"))


def test_val_splits(tmp_path):
    official_muse(tmp_path)
    write_refer(tmp_path / "refer_seg")
    cfg = demo(tmp_path, 'data.val=["refcoco", "refcoco:mode=val_multi", "muse", "refcoco", "easy=muse:limit=1"]')
    splits = val_splits(cfg)
    assert [(s.name, s.protocol) for s in splits] == [
        ("refcoco_val", "teacher_forced"), ("refcoco_val_multi", "teacher_forced"), ("muse", "generate"),
        ("refcoco_val_3", "teacher_forced"), ("easy", "generate")]
    assert splits[0].source.mode == "val" and len(splits[2].source) == 1  # muse_val.json
    with pytest.raises(ConfigError, match=r"data\.val\[0\]"):
        val_splits(demo(tmp_path, 'data.val=["refcoco:captions=3"]'))
