"""The synthetic shapes dataset: masks match what the text describes, for many seeds; determinism.

The checks re-derive everything independently: names are matched against the scene's shape list,
each target's mask is recomputed from the shape geometry with this file's own inside-tests (later
shapes occluding earlier ones), its colour is read back from the image pixels under the mask, its
kind from the fill ratio of unoccluded masks, and relations from the shape centres.
"""

import re

import numpy as np
import pytest

from pixellm_jax.data.sample import SEG_PLACEHOLDER, Sample
from pixellm_jax.data.synthetic import (
    _SQUARE_HALF_SIDE,
    _TRIANGLE_RADIUS,
    COLOURS,
    REFER_ANSWERS,
    SyntheticShapes,
    answer_name,
    join_list,
)

SEG = re.escape(SEG_PLACEHOLDER)


def _inside(shape, h, w):
    """This test's own geometry: pixel centres inside the full shape."""
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    if shape.kind == "circle":
        return np.hypot(xx - shape.cx, yy - shape.cy) <= shape.radius
    if shape.kind == "square":
        half = shape.radius * _SQUARE_HALF_SIDE
        return (np.abs(xx - shape.cx) <= half) & (np.abs(yy - shape.cy) <= half)
    r = shape.radius * _TRIANGLE_RADIUS
    a = np.array([shape.cx, shape.cy - r])
    b = np.array([shape.cx + r * np.sqrt(3) / 2, shape.cy + r / 2])
    c = np.array([shape.cx - r * np.sqrt(3) / 2, shape.cy + r / 2])

    def side(p, q):  # >= 0 on the inner side of edge p->q (clockwise on screen)
        return (q[0] - p[0]) * (yy - p[1]) - (q[1] - p[1]) * (xx - p[0])

    eps = 1e-9
    return (side(a, b) >= -eps) & (side(b, c) >= -eps) & (side(c, a) >= -eps)


def _expected_visible(scene, i):
    h, w = scene.image.shape[:2]
    mask = _inside(scene.shapes[i], h, w)
    for later in scene.shapes[i + 1 :]:
        mask &= ~_inside(later, h, w)
    return mask


def _find(scene, name):
    """Indices of the shapes a description like "red circle" / "large red circle" names."""
    words = name.split()
    size = words[0] if len(words) == 3 else None
    colour, kind = words[-2], words[-1]
    return [i for i, s in enumerate(scene.shapes)
            if s.colour == colour and s.kind == kind and (size is None or s.size == size)]


def _kind_from_mask(mask):
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"


def _split_names(text):
    return re.split(r", | and ", text)


def _parse(question):
    q = question.removeprefix("<image>\n")
    m = re.fullmatch(r"(?:Segment the shapes|Which shapes are) (left of|right of|above|below) the (.+?)"
                     r"(?:\.|\? Please output segmentation mask\.)", q)
    if m:
        return "relation", m.group(1), [m.group(2)]
    m = re.fullmatch(r"(?:Can you segment|Please segment|What is) the (.+?)"
                     r"(?: in this image\?| in this image\.|\.| in this image\? Please output segmentation mask\.)", q)
    assert m, f"unexpected question {question!r}"
    names = _split_names(m.group(1))
    return ("refer" if len(names) == 1 else "multi"), None, names


def _check_target_mask(scene, i, mask, question):
    h, w = scene.image.shape[:2]
    np.testing.assert_array_equal(mask, _expected_visible(scene, i), err_msg=question)
    assert mask.any()
    shape = scene.shapes[i]
    # Colour read back from the pixels under the mask.
    colours = np.unique(scene.image[mask], axis=0)
    assert colours.tolist() == [list(COLOURS[shape.colour])], question
    # Position: the visible pixels are around the described centre.
    ys, xs = np.nonzero(mask)
    assert abs(xs.mean() + 0.5 - shape.cx) < shape.radius * _TRIANGLE_RADIUS
    assert abs(ys.mean() + 0.5 - shape.cy) < shape.radius * _TRIANGLE_RADIUS
    # Kind from the mask's fill ratio, when nothing occludes it.
    if mask.sum() == _inside(shape, h, w).sum():
        assert _kind_from_mask(mask) == shape.kind, question


def _check_sample(src, sample: Sample, counts):
    index = int(sample.sample_id.split(":")[1])
    scene = src.scene(index)
    np.testing.assert_array_equal(sample.image, scene.image)
    h, w = scene.image.shape[:2]
    assert src.min_size <= h <= src.max_size and src.min_size <= w <= src.max_size
    assert 2 <= len(scene.shapes) <= 5
    for conv in sample.conversations:
        assert len(conv.turns) == 1
        question, answer = conv.turns[0]
        assert question.startswith("<image>\n")
        kind, relation, names = _parse(question)
        counts[kind] += 1
        for name in names:  # every description names exactly one shape
            assert len(_find(scene, name)) == 1, (question, [s for s in scene.shapes])
            counts["with_size"] += len(name.split()) == 3
        if kind == "refer":
            targets = _find(scene, names[0])
            assert answer in [a.format(name=answer_name(names[0]), seg=SEG_PLACEHOLDER) for a in REFER_ANSWERS]
        elif kind == "multi":
            targets = [_find(scene, n)[0] for n in names]
            assert len(set(targets)) == len(targets) and 2 <= len(targets) <= 3
            named = [f"{answer_name(n)} {SEG_PLACEHOLDER}" for n in names]
            per_target = " and ".join([", ".join(named[:-1]), named[-1]]) + "."
            assert answer == per_target, answer
        else:
            (anchor,) = _find(scene, names[0])
            a = scene.shapes[anchor]
            horizontal = relation in ("left of", "right of")
            side = w if horizontal else h
            targets = []
            for j, s in enumerate(scene.shapes):
                if j == anchor:
                    continue
                d = (s.cx - a.cx) if horizontal else (s.cy - a.cy)
                assert abs(d) >= src.relation_margin * side, "ambiguous relation asked"
                if {"left of": d < 0, "right of": d > 0, "above": d < 0, "below": d > 0}[relation]:
                    targets.append(j)
            targets.sort(key=lambda j: (scene.shapes[j].cx, scene.shapes[j].cy))
            assert 1 <= len(targets) <= src.max_targets
            n = len(targets)
            if all(scene.names[i] for i in targets):  # each target named in the answer, left to right
                named = [f"the {answer_name(scene.names[i])} {SEG_PLACEHOLDER}" for i in targets]
                assert answer == f"Sure, {join_list(named)}.", answer
                counts["relation_named"] = counts.get("relation_named", 0) + 1
            else:
                assert re.fullmatch(rf"Sure, (it is {SEG}|they are ({SEG}, )*{SEG} and {SEG})\.", answer), answer
            counts["relation_targets"] = max(counts.get("relation_targets", 0), n)
        assert answer.count(SEG_PLACEHOLDER) == len(targets) == conv.masks.shape[0]
        if kind != "relation":  # the named colour and kind are the target's
            assert [(scene.shapes[i].colour, scene.shapes[i].kind) for i in targets] == [
                tuple(n.split()[-2:]) for n in names]
        for i, mask in zip(targets, conv.masks):
            _check_target_mask(scene, i, mask, question)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_masks_match_text(seed):
    src = SyntheticShapes(num_samples=1000, seed=seed, questions_per_image=3)
    counts = {"refer": 0, "multi": 0, "relation": 0, "with_size": 0}
    for index in range(0, 1000, 17):
        _check_sample(src, src.get(index, np.random.default_rng([seed, index])), counts)
    assert counts["refer"] > 10 and counts["multi"] > 10 and counts["relation"] > 10, counts
    assert counts["with_size"] > 0 and counts["relation_targets"] >= 2 and counts["relation_named"] > 5, counts


def test_occlusion_happens_and_is_handled():
    src = SyntheticShapes(num_samples=300)
    occluded = 0
    for index in range(300):
        scene = src.scene(index)
        h, w = scene.image.shape[:2]
        for i, s in enumerate(scene.shapes):
            full = _inside(s, h, w)
            np.testing.assert_array_equal(scene.visible[i], _expected_visible(scene, i))
            assert scene.visible[i].sum() >= src.min_visible * full.sum()
            occluded += scene.visible[i].sum() < full.sum()
        # The masks partition the painted pixels; shapes of one colour never touch.
        assert not (scene.visible.sum(0) > 1).any()
        same = [(a, b) for a in scene.shapes for b in scene.shapes if a is not b and a.colour == b.colour]
        assert all(np.hypot(a.cx - b.cx, a.cy - b.cy) > (a.radius + b.radius) * _TRIANGLE_RADIUS for a, b in same)
    assert occluded > 20


def test_deterministic_from_seed_and_index():
    a = SyntheticShapes(num_samples=50, seed=3)
    b = SyntheticShapes(num_samples=50, seed=3)
    for index in (0, 13, 49):
        sa, sb = a.get(index, np.random.default_rng(5)), b.get(index, np.random.default_rng(5))
        np.testing.assert_array_equal(sa.image, sb.image)
        assert [c.turns for c in sa.conversations] == [c.turns for c in sb.conversations]
        for ca, cb in zip(sa.conversations, sb.conversations):
            np.testing.assert_array_equal(ca.masks, cb.masks)
        assert sa.sample_id == f"synthetic:{index}" and sa.dataset == "synthetic"
    # The scene depends on (seed, index) only; the questions on the rng.
    s1, s2 = a.get(7, np.random.default_rng(1)), a.get(7, np.random.default_rng(2))
    np.testing.assert_array_equal(s1.image, s2.image)
    other = SyntheticShapes(num_samples=50, seed=4)
    assert not np.array_equal(other.scene(7).image, a.scene(7).image)
    assert len({a.scene(i).image.tobytes() for i in range(20)}) == 20


def test_configurable_and_validated():
    src = SyntheticShapes(num_samples=5, min_size=128, max_size=128, min_shapes=3, max_shapes=3,
                          questions_per_image=1, kind_weights=(0, 0, 1))
    for i in range(5):
        s = src.get(i, np.random.default_rng(i))
        assert s.image.shape == (128, 128, 3) and len(src.scene(i).shapes) == 3
        assert len(s.conversations) == 1
    with pytest.raises(IndexError):
        src.scene(5)
    with pytest.raises(ValueError):
        SyntheticShapes(min_shapes=1)
    with pytest.raises(ValueError):
        SyntheticShapes(kind_weights=(1,) * 7)  # more weights than kinds
    with pytest.raises(ValueError):
        SyntheticShapes(kind_weights=(0, 0))
