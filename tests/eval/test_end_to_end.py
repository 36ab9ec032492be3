"""`pixellm eval` / `pixellm predict` on a saved tiny checkpoint and tiny real-format datasets.

Eval runs on the 8 simulated devices; its teacher-forced numbers are recomputed directly (a plain
single-device forward, the official post-processing and IoU formula), and its generation split is
re-run on one device, which must give the same rows.
"""

import json
import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from pixellm_jax.cli import main
from pixellm_jax.data.conversation import tokenize_training
from pixellm_jax.data.refer import ReferSource
from pixellm_jax.data.synthetic import SyntheticShapes
from pixellm_jax.data.transforms import preprocess_image
from pixellm_jax.eval.batches import BatchShape, eval_batches
from pixellm_jax.eval.evaluate import EvalSettings, Split, evaluate_split
from pixellm_jax.eval.generate import SamplingConfig
from pixellm_jax.eval.loading import load_for_inference
from pixellm_jax.eval.metrics import official_iou
from pixellm_jax.eval.runner import BatchRunner, data_mesh
from pixellm_jax.eval.teacher_forced import teacher_forced_outputs
from pixellm_jax.postprocess import postprocess_masks
from tests.data.test_refer import write_refer
from tests.eval.tiny import sure_seg_checkpoint

pytestmark = pytest.mark.slow

MAX_NEW = 12
BUCKET = 257


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    # greedy answers are "Sure, [SEG0] ... [SEG5]." then </s>, whatever the question
    model, cfg, hf, legacy, answer = sure_seg_checkpoint(tmp)
    answer_length = len(answer) + 1
    refer = write_refer(tmp / "refer")
    splits = [f"refer=refer:root={refer},dataset=refcoco,split=train",
              f"multi=refer:root={refer},dataset=refcoco,split=train,mode=val_multi",
              "syn=synthetic:num_samples=3,seed=2,questions_per_image=2"]
    out = tmp / "eval"
    args = ["eval", "--checkpoint", str(tmp / "ckpt"), "--out", str(out), "--max-new-tokens", str(MAX_NEW),
            "--no-progress", "--judge", f"data.token_buckets=[{BUCKET}]"]  # one bucket: fewer programs
    assert main(args + [a for s in splits for a in ("--split", s)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    records = {name: [json.loads(line) for line in (out / f"{name}.samples.jsonl").open()]
               for name in ("refer", "multi", "syn")}
    return SimpleNamespace(tmp=tmp, ckpt=tmp / "ckpt", refer=refer, out=out, metrics=metrics, records=records,
                           answer_length=answer_length)


def direct_referring(loaded, sources):
    """Per split: gIoU, cIoU and per-target (I, U) from one plain single-device forward of every conversation."""
    cfg, tok = loaded.config, loaded.legacy
    rows = []  # (split, image, conversation)
    for name, source in sources.items():
        for index in range(len(source)):
            sample = source.get(index, np.random.default_rng([0, index]))
            prep = preprocess_image(sample.image, cfg.model.vision.image_size, cfg.data.normalization)
            rows += [(name, prep, conv) for conv in sample.conversations]
    t = BUCKET
    ids = np.zeros((len(rows), t), np.int32)
    for j, (_, _, conv) in enumerate(rows):
        row = tokenize_training(tok, conv.turns, t).input_ids
        ids[j, : len(row)] = row
    hw = rows[0][1].original_hw
    assert all(p.original_hw == hw for _, p, _ in rows)  # one image: one output size

    @nnx.jit
    def forward(model, pixels, resized, ids):
        out = model(pixels, resized, ids, ids != 0, jnp.arange(ids.shape[0], dtype=jnp.int32))
        n, m = out.mask_logits.shape[:2]
        logits, _ = postprocess_masks(out.mask_logits.reshape(n * m, *out.mask_logits.shape[2:]),
                                      jnp.repeat(resized, m, axis=0), jnp.asarray([hw] * (n * m)), hw,
                                      cfg.model.vision.image_size)
        return logits.reshape(n, m, *hw), out.seg.num_targets

    logits, num_targets = forward(loaded.model, jnp.asarray(np.stack([p.pixels for _, p, _ in rows])),
                                  jnp.asarray([p.resized_hw for _, p, _ in rows]), jnp.asarray(ids))
    results = {name: ([], 0, 0, []) for name in sources}
    for j, (name, prep, conv) in enumerate(rows):
        k = conv.masks.shape[0]
        assert int(num_targets[j]) == k
        ious, inter, union, per_target = results[name]
        for pred, gt in zip(np.asarray(logits[j, :k]) > 0, conv.masks):
            i, u = int((pred & gt).sum()), int((pred | gt).sum())
            per_target.append((i, u))
            ious.append(official_iou(i, u))
            inter, union = inter + i, union + u
        results[name] = (ious, inter, union, per_target)
    return {name: (np.mean(ious), inter / (union + 1e-10), per_target) for name, (ious, inter, union, per_target)
            in results.items()}


def test_eval_teacher_forced_equals_direct_computation(env):
    loaded = load_for_inference(env.ckpt)
    sources = {split: ReferSource(env.refer, "refcoco", split="train", mode=mode)
               for split, mode in (("refer", "val"), ("multi", "val_multi"))}
    for split, (giou, ciou, per_target) in direct_referring(loaded, sources).items():
        m = env.metrics[split]
        assert m["protocol"] == "teacher_forced" and m["targets"] == 3 and m["malformed_answers"] == 0
        assert m["giou"] == pytest.approx(giou, abs=1e-6) and m["ciou"] == pytest.approx(ciou, abs=1e-6)
        got = [(t["intersection"], t["union"]) for r in env.records[split] for t in r["targets"]]
        assert got == per_target
        assert any(u > i > 0 for i, u in got)  # a non-trivial prediction was scored
        questions = [r["question"] for r in env.records[split]]
        assert len(questions) == (3 if split == "refer" else 1) and "What is" in questions[0]


def test_eval_generation_records_and_metrics(env):
    records = env.records["syn"]
    assert len(records) == 6 and env.metrics["syn"]["rows"] == 6
    assert {r["answer"] for r in records} == {"Sure, [1]."}
    assert all(r["num_pred"] == 1 and not r["malformed"] and r["generated_tokens"] == env.answer_length for r in records)
    # the metrics are the records' pairs summed up (corrected) / per image (official)
    meter_pairs = [p for r in records for p in r["pairs"]]
    m = env.metrics["syn"]
    assert m["corrected"]["pairs"] == len(meter_pairs) == sum(max(r["num_pred"], r["num_gt"]) for r in records)
    assert m["corrected"]["giou"] == pytest.approx(np.mean([p["iou"] for p in meter_pairs]))
    per_image = {}
    for r in records:
        p, g = per_image.get(r["sample_id"], (0, 0))
        per_image[r["sample_id"]] = (p + r["num_pred"], g + r["num_gt"])
    assert m["official"]["normaliser"] == sum(max(v) for v in per_image.values())
    assert m["official"]["giou"] == pytest.approx(sum(p["official_iou"] for p in meter_pairs) / m["official"]["normaliser"])
    assert m["matched"] == 6 and m["predictions"] == 6
    exact = [r["num_pred"] == r["num_gt"] and all(p["iou"] >= 0.5 for p in r["pairs"]) for r in records]
    assert m["questions"] == 6 and m["exact_targets"] == pytest.approx(np.mean(exact))
    assert m["baseline_giou"] is None  # the built-in synthetic source does not list every instance
    prompts = [json.loads(line) for line in (env.out / "syn.judge_prompts.jsonl").open()]
    assert len(prompts) == 6 and "Reference answer:" in prompts[0]["prompt"]


def test_sharded_generation_equals_one_device(env):
    loaded = load_for_inference(env.ckpt)
    runner = BatchRunner(loaded.model, data_mesh(jax.devices()[:1]))
    cfg = loaded.config
    shape = BatchShape(images=8, rows=8, image_size=cfg.model.vision.image_size, token_buckets=(BUCKET,))
    settings = EvalSettings(shape=shape, sampling=SamplingConfig(max_new_tokens=MAX_NEW))
    source = SyntheticShapes(num_samples=3, seed=2, questions_per_image=2)
    result = evaluate_split(runner, loaded.legacy, lambda ids: loaded.tokenizer.decode(ids), Split("syn", source, "generate"),
                            settings, progress=False)
    assert result.records == env.records["syn"]
    assert json.loads(json.dumps(result.metrics)) == env.metrics["syn"]


def test_predict_writes_pngs_of_the_input_size(env, capsys):
    folder = env.tmp / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"wide.png": (70, 90), "tall.jpg": (100, 60)}
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / name)
    out = env.tmp / "pred"
    args = ["predict", "--checkpoint", str(env.ckpt), "--image", str(folder), "--question", "Where is the red circle?",
            "--out", str(out), "--max-new-tokens", str(MAX_NEW), f"data.token_buckets=[{BUCKET}]"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("Sure, [1].") == 2
    for name, (h, w) in sizes.items():
        stem = name.split(".")[0]
        with Image.open(out / f"{stem}_overlay.png") as im:
            assert im.format == "PNG" and im.size == (w, h) and im.mode == "RGB"
        with Image.open(out / f"{stem}_mask_1.png") as im:
            assert im.format == "PNG" and im.size == (w, h) and im.mode == "L"
            assert set(np.unique(np.asarray(im)).tolist()) <= {0, 255}
        assert not (out / f"{stem}_mask_2.png").exists()


def test_blocked_batches_gather_image_features_on_their_own_devices(env):
    """One block per device: the teacher-forced step's image gathers need no collective (one block does)."""
    loaded = load_for_inference(env.ckpt)
    runner = BatchRunner(loaded.model)
    size = loaded.config.model.vision.image_size

    def compiled_text(groups):
        shape = BatchShape(images=8, rows=8, image_size=size, token_buckets=(BUCKET,), groups=groups)
        batch = next(eval_batches(SyntheticShapes(num_samples=8, seed=1), loaded.legacy, "teacher_forced", shape))
        graphdef, state = nnx.split(runner.model)
        step = jax.jit(lambda s, a: teacher_forced_outputs(nnx.merge(graphdef, s), a, batch.out_hw, groups))
        with jax.set_mesh(runner.mesh):
            return step.lower(state, runner._global(batch.arrays)).compile().as_text()

    def gathered(groups):  # shapes of the floating-point arrays all-gathered
        return re.findall(r"= (?:f32|bf16)(\[[\d,]*\])\S* all-gather\(", compiled_text(groups))

    assert gathered(1) and not gathered(8)
