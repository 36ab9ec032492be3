"""Multi-target reasoning questions of the synthetic dataset, and the dataset written in MUSE layout.

Targets are re-derived from the scene's shape list (kind, size, left-to-right order), answers are
parsed back into one description per target, and the MUSE files are read through `MuseSource` (the
loader a user's MUSE data go through) and compared pixel for pixel with the generator's masks.
"""

import json
import re

import numpy as np
import pytest

from pixellm_jax.cli import main
from pixellm_jax.data.muse import MuseSource
from pixellm_jax.data.sample import SEG_PLACEHOLDER
from pixellm_jax.data.synthetic import SyntheticShapes
from pixellm_jax.data.synthetic_layout import write_synthetic_muse

SEG = re.escape(SEG_PLACEHOLDER)
TARGET = rf"the ((?:small |large )?(?:circle|square|triangle) in \w+) {SEG}"


def _named(answer):
    """The descriptions "circle in red" of an answer's targets, in order."""
    return re.findall(rf"((?:small |large )?(?:circle|square|triangle) in \w+) {SEG}", answer)


def _order(scene, idx):
    return sorted(idx, key=lambda i: (scene.shapes[i].cx, scene.shapes[i].cy))


@pytest.mark.parametrize("kind", ["class", "size", "count"])
def test_reasoning_questions_name_the_right_targets(kind):
    src = SyntheticShapes(num_samples=400, seed=2, max_targets=3)
    asked = 0
    for index in range(0, 400, 3):
        scene = src.scene(index)
        rng = np.random.default_rng(index)
        question, answer, targets = src.question(scene, kind, rng)
        if kind == "size":
            m = re.fullmatch(r"(?:Which shapes in this image are|Segment all the) (small|large)(?: shapes)?"
                             r"(?:\? Please output segmentation mask)?\.", question)
        else:
            m = re.fullmatch(r"(?:Segment every|Can you segment all the|How many|Count the) "
                             r"(circle|square|triangle)s?(?: in this image| here| are in this image| and segment them)?"
                             r"(?:\? Segment each of them)?[.?]", question)
        if m is None:  # the scene could not support the kind: a referring question instead
            assert re.search(r"segment the .* in this image|What is the", question, re.I), question
            continue
        asked += 1
        attr = m.group(1)
        expected = _order(scene, [i for i, s in enumerate(scene.shapes)
                                  if (s.size if kind == "size" else s.kind) == attr])
        assert targets == expected, (question, answer)
        assert answer.count(SEG_PLACEHOLDER) == len(targets)
        names = _named(answer)
        assert [tuple(n.split()[-3::2]) for n in names] == [(scene.shapes[i].kind, scene.shapes[i].colour)
                                                             for i in targets], answer
        if kind == "count":
            number = ["one", "two", "three"][len(targets) - 1]
            assert answer.startswith("There is one:" if len(targets) == 1 else f"There are {number}:"), answer
        # Each description names its target alone in the scene (the question does not name them).
        for n, i in zip(names, targets):
            words = n.split()
            size = words[0] if len(words) == 4 else None
            same = [j for j, s in enumerate(scene.shapes) if (s.kind, s.colour) == (words[-3], words[-1])
                    and (size is None or s.size == size)]
            assert same == [i], (n, answer)
    assert asked > 40


def test_muse_layout_reads_back_through_the_muse_loader(tmp_path):
    out = tmp_path / "shapes"
    written = write_synthetic_muse(out, ["train", "val"], [12, 5], seed=4)
    assert written.images == {"train": 12, "val": 5}
    assert sorted(p.name for p in out.iterdir()) == ["images", "muse_train.json", "muse_val.json",
                                                      "refer_train.json", "refer_val.json"]
    for k, (split, n) in enumerate([("train", 12), ("val", 5)]):
        gen = SyntheticShapes(num_samples=n, seed=4 + k)
        for name, per_image in (("muse", 3), ("refer", 2)):
            records = json.loads((out / f"{name}_{split}.json").read_text())
            assert len(records) == n
            source = MuseSource(out / f"{name}_{split}.json", out / "images")
            for index, rec in enumerate(records):
                scene = gen.scene(index)
                assert len(rec["questions"]) == per_image == len(rec["text_answers"])
                for text, targets in zip(rec["text_answers"], rec["answers"]):
                    assert text.count("{seg}") == len(targets) >= 1
                    assert (len(targets) == 1) or name == "muse"
                sample = source.get(index, np.random.default_rng(0))
                np.testing.assert_array_equal(sample.image, scene.image)
                # the mark-everything baseline's mask: every shape of the scene
                np.testing.assert_array_equal(source.scene_mask(index), scene.visible.any(axis=0))
                assert len(sample.conversations) == per_image
                for conv, targets in zip(sample.conversations, rec["answers"]):
                    np.testing.assert_array_equal(conv.masks, scene.visible[[t["id"] for t in targets]])
                    assert conv.turns[0][1].count(SEG_PLACEHOLDER) == len(targets)
                    assert conv.turns[0][0].count("segmentation mask") <= 1  # the loader adds the one request
            assert source.skipped_questions == 0
    # Held-out scenes are not training scenes; several reasoning kinds with several targets appear.
    train = json.loads((out / "muse_train.json").read_text())
    assert max(len(a) for r in train for a in r["answers"]) >= 2
    assert len({q.split()[0] for r in train for q in r["questions"]}) >= 4


def test_muse_layout_is_written_beside_then_renamed(tmp_path):
    out = tmp_path / "shapes"
    write_synthetic_muse(out, ["train"], 2)
    before = (out / "muse_train.json").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        write_synthetic_muse(out, ["train"], 3)
    assert (out / "muse_train.json").read_bytes() == before
    write_synthetic_muse(out, ["train"], 3, overwrite=True)
    assert len(json.loads((out / "muse_train.json").read_text())) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]  # nothing left beside it
    with pytest.raises(ValueError, match="splits repeat"):
        write_synthetic_muse(tmp_path / "x", ["train", "train"], 2)


def test_prepare_data_cli_writes_the_muse_layout(tmp_path, capsys):
    out = tmp_path / "data"
    args = ["prepare-data", "--source", "synthetic", "--layout", "muse", "--out", str(out),
            "--split", "train", "--split", "val", "--num-samples", "6", "2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "synthetic split train: 6 images, 18 reasoning questions" in printed
    assert "synthetic split val: 2 images" in printed and f"muse:json={out}/muse_train.json" in printed
    assert len(json.loads((out / "refer_val.json").read_text())) == 2
    assert main(args) == 2 and "exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prepare-data", "--source", "muse", "--layout", "muse", "--out", str(out)])
    more = ["prepare-data", "--source", "synthetic", "--layout", "muse", "--out", str(tmp_path / "more"),
            "--num-samples", "3", "--reasoning-questions", "5", "--refer-questions", "1"]
    assert main(more) == 0
    records = json.loads((tmp_path / "more" / "muse_train.json").read_text())
    assert [len(r["questions"]) for r in records] == [5, 5, 5]
    assert [len(r["questions"]) for r in json.loads((tmp_path / "more" / "refer_val.json").read_text())] == [1] * 3
    assert main(more[:-1] + ["0", "--overwrite"]) == 2 and "at least one" in capsys.readouterr().err
