"""TFDS ArrayRecord preparation (`pixellm prepare-data`) and `TfdsSource`: prepared datasets give the
raw sources' samples for the same rng, reading imports no TensorFlow, bad input is named."""

import json
import pickle
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")

from pixellm_jax.cli import main as cli_main  # noqa: E402
from pixellm_jax.data.dataset_io import DatasetFileError  # noqa: E402
from pixellm_jax.data.muse import MuseSource  # noqa: E402
from pixellm_jax.data.refer import ReferSource  # noqa: E402
from pixellm_jax.data.sample import BadSample  # noqa: E402
from pixellm_jax.data.synthetic import SyntheticShapes  # noqa: E402
from pixellm_jax.data.tfds_prepare import MuseWriter, ReferWriter, SyntheticWriter, prepare  # noqa: E402
from pixellm_jax.data.tfds_source import TfdsSource  # noqa: E402
from tests.data.test_muse import records as muse_records  # noqa: E402
from tests.data.test_muse import write_muse  # noqa: E402
from tests.data.test_refer import write_refer  # noqa: E402
from tests.tiny_tokenizer import build_tiny_tokenizer  # noqa: E402

SYNTHETIC = dict(num_samples=12, seed=5)
MISSING_MUSE = {"file_name": "missing.jpg", "height": 16, "width": 24, "ann_list": [{}], "questions": [], "answers": []}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Raw fixtures and their prepared datasets, in one TFDS data_dir."""
    tmp = tmp_path_factory.mktemp("tfds")
    refer_root = write_refer(tmp / "refer_seg", extra_sents=7)
    muse_root = tmp / "muse"
    muse_root.mkdir()
    write_muse(muse_root, muse_records() + [MISSING_MUSE])
    out = tmp / "prepared"
    assert cli_main(["prepare-data", "--source", "refcoco", "--root", str(refer_root), "--out", str(out)]) == 0
    muse = prepare(MuseWriter(muse_root, image_dir=muse_root / "images"), out)
    prepare(SyntheticWriter(["train"], **SYNTHETIC), out)
    return {"tmp": tmp, "refer": refer_root, "muse": muse_root, "out": out, "muse_prepared": muse}


def assert_same(a, b):
    assert (a.sample_id, a.dataset) == (b.sample_id, b.dataset)
    np.testing.assert_array_equal(a.image, b.image)
    assert [c.turns for c in a.conversations] == [c.turns for c in b.conversations]
    for c, d in zip(a.conversations, b.conversations):
        np.testing.assert_array_equal(c.masks, d.masks)


@pytest.mark.parametrize("split", ["train", "val", "testA"])
@pytest.mark.parametrize("options", [{}, {"num_classes_per_question": 1}, {"mode": "val"}, {"mode": "val_multi"}])
def test_refer_matches_raw_source(data, split, options):
    raw = ReferSource(data["refer"], "refcoco", split, **options)
    ours = TfdsSource("pixellm_records/refcoco_unc", split, data["out"], **options)
    assert len(ours) == len(raw) and ours.name == raw.name == "refcoco"
    for i in range(len(raw)):
        for seed in range(6):
            assert_same(ours.get(i, np.random.default_rng(seed)), raw.get(i, np.random.default_rng(seed)))


def test_muse_matches_raw_source_and_bad_record_is_skipped(data):
    raw = MuseSource(data["muse"] / "muse_train.json", data["muse"] / "images")
    ours = TfdsSource("pixellm_records/muse", "train", data["out"])
    assert len(raw) == 3 and len(ours) == 2  # the record with a missing image was skipped when preparing
    for i in range(2):
        for seed in range(8):
            assert_same(ours.get(i, np.random.default_rng(seed)), raw.get(i, np.random.default_rng(seed)))
    (skipped,) = data["muse_prepared"].skipped["train"]
    assert skipped.startswith("muse:missing.jpg: image file not found")
    metadata = json.loads((data["out"] / "pixellm_records/muse/1.0.0/metadata.json").read_text())
    assert metadata["skipped"] == {"train": [skipped]}


def test_synthetic_matches_raw_source_and_is_deterministic(data):
    raw = SyntheticShapes(**SYNTHETIC)
    ours = TfdsSource("pixellm_records/synthetic", "train", data["out"], questions_per_image=3)
    again = pickle.loads(pickle.dumps(ours))  # as Grain hands sources to worker processes
    raw3 = SyntheticShapes(**SYNTHETIC, questions_per_image=3)
    assert len(ours) == len(raw) == SYNTHETIC["num_samples"]
    for i in range(len(raw)):
        a = ours.get(i, np.random.default_rng([7, i]))
        assert_same(a, raw3.get(i, np.random.default_rng([7, i])))
        assert_same(a, again.get(i, np.random.default_rng([7, i])))
    assert_same(TfdsSource("pixellm_records/synthetic", "train", data["out"]).get(3, np.random.default_rng(1)),
                raw.get(3, np.random.default_rng(1)))


@pytest.mark.slow
def test_reading_imports_no_tensorflow(data):
    """Reading prepared data, through the training pipeline too, never imports TensorFlow."""
    tok_dir = build_tiny_tokenizer(data["tmp"] / "tok")
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        from transformers import AutoTokenizer
        from pixellm_jax.data.conversation import LegacyTokenizer
        from pixellm_jax.data.pipeline import InputPipeline, PipelineConfig
        from pixellm_jax.data.tfds_source import TfdsSource
        from pixellm_jax.tokens import add_codebook_tokens

        out = {str(data["out"])!r}
        sources = [TfdsSource("pixellm_records/refcoco_unc", "train", out),
                   TfdsSource("pixellm_records/muse", "train", out),
                   TfdsSource("pixellm_records/synthetic", "train", out, questions_per_image=1)]
        for s in sources:
            s.get(0, np.random.default_rng(0))
        hf = AutoTokenizer.from_pretrained({str(tok_dir)!r})
        add_codebook_tokens(hf, 3, 2)
        hf.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)
        cfg = PipelineConfig(images_per_batch=2, conversations_per_batch=6, token_buckets=[96, 160, 257],
                             image_size=56, mask_size=56, n_image_tokens=4, model_max_length=260, num_epochs=1)
        pipeline = InputPipeline(sources, LegacyTokenizer.from_transformers(hf, 3, 2), cfg, process_index=0,
                                 process_count=1)
        batch = next(iter(pipeline))
        assert batch["image_valid"].all() and batch["conv_valid"].any(), pipeline.stats
        loaded = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow."))
        assert not loaded, loaded
        print("read without tensorflow")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "read without tensorflow" in result.stdout


def test_missing_dataset_and_split_are_named(data):
    with pytest.raises(DatasetFileError, match="nowhere/pixellm_records/refcoco_unc.*pixellm prepare-data"):
        TfdsSource("pixellm_records/refcoco_unc", "train", data["tmp"] / "nowhere")
    with pytest.raises(DatasetFileError, match=r"refcoco_unc/1\.0\.0.*testB"):
        TfdsSource("pixellm_records/refcoco_unc", "testB", data["out"])


def test_corrupt_file_gives_bad_samples_naming_it(data):
    out = data["tmp"] / "corrupt"
    shutil.copytree(data["out"] / "pixellm_records/synthetic", out / "pixellm_records/synthetic")
    (shard,) = (out / "pixellm_records/synthetic/1.0.0").glob("*train.array_record*")
    content = bytearray(shard.read_bytes())
    content[64:400] = bytes(b ^ 0x5A for b in content[64:400])  # the first chunk's header and data
    shard.write_bytes(bytes(content))
    good = TfdsSource("pixellm_records/synthetic", "train", data["out"])
    bad = TfdsSource("pixellm_records/synthetic", "train", out)
    failed = 0
    for i in range(len(bad)):
        try:
            sample = bad.get(i, np.random.default_rng(i))
        except BadSample as e:
            failed += 1
            assert str(out / "pixellm_records/synthetic/1.0.0") in e.reason and e.sample_id == f"synthetic:{i}"
        else:
            assert_same(sample, good.get(i, np.random.default_rng(i)))
    assert failed >= 1


def test_malformed_record_content_is_named(data):
    src = TfdsSource("pixellm_records/refcoco_unc", "train", data["out"])
    example = {"sample_id": b"refcoco:x.jpg", "image": b"", "height": 2, "width": 2, "masks": [], "annotation": b"{"}
    with pytest.raises(BadSample, match="refcoco:x.jpg: malformed record in here"):
        src.adapter.sample(example, "here", np.random.default_rng(0))
    example["annotation"] = json.dumps({"sentences": [["a cup", 0]]}).encode()
    with pytest.raises(BadSample, match="refcoco:x.jpg: cannot decode the stored image"):
        src.adapter.sample(example, "here", np.random.default_rng(0))


def test_bad_image_when_preparing(data):
    root = write_refer(data["tmp"] / "refer_bad")
    (root / "images/mscoco/images/train2014/b.jpg").write_bytes(b"not a jpeg")  # the only testA image
    out = data["tmp"] / "prepared_bad"
    with pytest.raises(BadSample, match="refcoco:b.jpg: cannot decode the stored image"):
        prepare(ReferWriter(root, "refcoco"), out, ["testA"], on_bad_sample="raise")
    with pytest.raises(DatasetFileError, match="refcoco_unc split testA: no usable records"):
        prepare(ReferWriter(root, "refcoco"), out, ["testA"])
    assert not (out / "pixellm_records/refcoco_unc/1.0.0").exists()  # nothing half-written in place
    result = prepare(ReferWriter(root, "refcoco"), out, ["train"])
    assert result.num_records == {"train": 1} and result.skipped == {"train": []}


def test_existing_dataset_is_replaced_only_when_asked(data, capsys):
    out = data["tmp"] / "prepared_twice"
    prepare(SyntheticWriter(["train"], num_samples=2, seed=0), out)
    with pytest.raises(FileExistsError, match="overwrite"):
        prepare(SyntheticWriter(["train"], num_samples=3, seed=0), out)
    args = ["prepare-data", "--source", "synthetic", "--num-samples", "3", "--out", str(out)]
    assert cli_main(args) == 2 and "exists" in capsys.readouterr().err
    assert cli_main(args + ["--overwrite"]) == 0
    assert "pixellm_records/synthetic split train: 3 records, 0 skipped" in capsys.readouterr().out
    assert len(TfdsSource("pixellm_records/synthetic", "train", out)) == 3
    assert sorted(p.name for p in (out / "pixellm_records/synthetic").iterdir()) == ["1.0.0"]


@pytest.mark.slow
def test_catalog_ref_coco_matches_raw_source(data):
    """The TFDS catalog's `ref_coco` (built by its own builder, which needs TensorFlow) reads as refCOCO."""
    pytest.importorskip("tensorflow")
    import tensorflow_datasets as tfds

    refs = pickle.loads((data["refer"] / "refcoco/refs(unc).p").read_bytes())
    instances = json.loads((data["refer"] / "refcoco/instances.json").read_text())
    anns = {a["id"]: {**a, "area": 1, "bbox": [0, 0, 1, 1]} for a in instances["annotations"]}
    manual = data["tmp"] / "ref_coco_manual"
    (manual / "coco_train2014").mkdir(parents=True)
    shutil.copy(data["refer"] / "images/mscoco/images/train2014/a.jpg", manual / "coco_train2014/a.jpg")
    catalog_refs = [  # the train refs (polygons), and one ref per other split of the refcoco_unc config
        {"dataset": "refcoco", "dataset_partition": "unc", "split": r["split"], "image_id": 1, "ref_id": r["ref_id"],
         "ann": anns[r["ann_id"]], "sentences": [{"raw": s["sent"], "sent_id": s["sent_id"]} for s in r["sentences"]]}
        for r in refs if r["split"] == "train"
    ] + [{"dataset": "refcoco", "dataset_partition": "unc", "split": split, "image_id": 1, "ref_id": 10 + k,
          "ann": anns[10], "sentences": [{"raw": "cup", "sent_id": 50 + k}]}
         for k, split in enumerate(["val", "testA", "testB"])]
    coco = {"1": {"info": instances["images"][0], "anns": [anns[10], anns[11]]}}
    (manual / "refcoco.json").write_text(json.dumps({"ref": catalog_refs, "coco_anns": coco}))
    builder = tfds.builder("ref_coco/refcoco_unc", data_dir=str(data["tmp"] / "catalog"), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))

    for options in ({}, {"mode": "val_multi"}):
        ours = TfdsSource("ref_coco/refcoco_unc", "train", data["tmp"] / "catalog", **options)
        raw = ReferSource(data["refer"], "refcoco", "train", **options)
        assert len(ours) == len(raw) == 1 and ours.name == "refcoco"
        for seed in range(6):
            a, b = ours.get(0, np.random.default_rng(seed)), raw.get(0, np.random.default_rng(seed))
            assert a.sample_id == "refcoco:image_id=1"
            b.sample_id = a.sample_id
            assert_same(a, b)
