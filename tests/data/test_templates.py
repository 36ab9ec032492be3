"""Question/answer templates: official strings, and exact compositions for known random choices."""

import numpy as np
import pytest

from pixellm_jax.data import templates as T
from pixellm_jax.data.sample import SEG_PLACEHOLDER


class ScriptedRng:
    """Stands in for np.random.Generator with scripted draws, so each template choice is known."""

    def __init__(self, integers=(), random=(), permutation=None, choice=None):
        self._ints, self._floats = list(integers), list(random)
        self._perm, self._choice = permutation, choice

    def integers(self, n):
        v = self._ints.pop(0)
        assert 0 <= v < n
        return v

    def random(self):
        return self._floats.pop(0)

    def permutation(self, n):
        return np.arange(n) if self._perm is None else np.asarray(self._perm)

    def choice(self, a, size=None, replace=True):
        return np.asarray(a)[0] if size is None else np.arange(size)

    def exhausted(self):
        return not self._ints and not self._floats


def test_official_lists():
    assert SEG_PLACEHOLDER == "[SEG]"
    assert T.SHORT_QUESTION_LIST[0] == "<image>\nCan you segment the {class_name} in this image?"
    assert T.SHORT_QUESTION_LIST[3] == "<image>\nWhat is {class_name} in this image? Please output segmentation mask."
    assert T.EXPAND_QUESTION_LIST[5] == "<image>\nCan you provide me with asegment of the {class_name}?"
    assert T.LONG_QUESTION_LIST == (
        "<image>\n{sent} Please respond with segmentation mask.",
        "<image>\n{sent} Please output segmentation mask.",
    )
    assert T.ANSWER_LIST == ("It is [SEG].", "Sure, [SEG].", "Sure, it is [SEG].", "Sure, the segmentation result is [SEG].", "[SEG].")
    assert T.SINGLE_ANSWER_LIST == ("{class_name} is [SEG].", "The segmentation result of {class_name} is [SEG].", "[SEG].")
    assert len(T.MULTI_ANSWER_LIST) == 11 and T.MULTI_ANSWER_LIST[-1] == "{seg}."
    assert T.MR_SINGLE_ANSWER_LIST == ("{class_name} is [SEG].",)
    assert T.MR_MULTI_ANSWER_LIST[-1] == "Sure, the segmentation result of {class_name} are {seg}, separately."
    assert len(T.MR_MULTI_ANSWER_LIST) == 8
    assert all(q.startswith("<image>\n") for q in T.short_question_list(True) + T.long_question_list(True))


def test_question_list_expansion():
    assert T.short_question_list() == T.SHORT_QUESTION_LIST
    assert len(T.short_question_list(expand=True)) == 4 + 14
    doubled = T.short_question_list(expand=True, official_duplicate=True)
    assert len(doubled) == 4 + 28 and doubled.count(T.EXPAND_QUESTION_LIST[0]) == 2
    assert doubled.count(T.SHORT_QUESTION_LIST[0]) == 1
    assert len(T.long_question_list(expand=True)) == 2 + 5


def test_join_and():
    assert T.join_and(["a"]) == "a"
    assert T.join_and(["a", "b"]) == "a and b"
    assert T.join_and(["a", "b", "c"]) == "a, b and c"


def test_single_target_turn():
    rng = ScriptedRng(integers=[0, 0, 1])  # question 0, (separate coin), answer 1
    assert T.segmentation_turn(["Cat"], rng) == ("<image>\nCan you segment the cat in this image?", "Sure, [SEG].")
    assert rng.exhausted()


def test_separate_answer_keeps_names_as_written():
    rng = ScriptedRng(integers=[3, 1, 0])  # question 3, separate, "{class_name} is [SEG]."
    q, a = T.segmentation_turn(["cat", "Dog", "car"], rng)
    assert q == "<image>\nWhat is cat, dog and car in this image? Please output segmentation mask."
    assert a == "cat is [SEG], Dog is [SEG] and car is [SEG]."
    rng = ScriptedRng(integers=[0, 1, 2])  # separate with the bare "[SEG]." template
    assert T.segmentation_turn(["a", "b", "c"], rng)[1] == "[SEG], [SEG] and [SEG]."


def test_multi_answer():
    rng = ScriptedRng(integers=[1, 0, 2])  # question 1, not separate, "Sure, {class_name} are {seg}, separately."
    q, a = T.segmentation_turn(["Cat", "dog"], rng)
    assert q == "<image>\nPlease segment the cat and dog in this image."
    assert a == "Sure, cat and dog are [SEG] and [SEG], separately."
    rng = ScriptedRng(integers=[0, 0, 10])
    assert T.segmentation_turn(["a", "b", "c"], rng)[1] == "[SEG], [SEG] and [SEG]."


def test_expanded_question_choice():
    questions = T.short_question_list(expand=True, official_duplicate=True)
    rng = ScriptedRng(integers=[4 + 14 + 7, 0, 4])
    assert T.segmentation_turn(["the sofa"], rng, questions) == ("<image>\nHelp me segment the the sofa.", "[SEG].")


def test_seeded_turns_exact():
    """Pins the draw order: a seed gives the same sample across runs and after a resume."""
    assert T.segmentation_turn(["Cat", "dog", "car"], np.random.default_rng(0)) == (
        "<image>\nWhat is cat, dog and car in this image? Please output segmentation mask.",
        "The segmentation result of Cat is [SEG], The segmentation result of dog is [SEG] and "
        "The segmentation result of car is [SEG].",
    )
    assert T.segmentation_turn(["Cat", "dog", "car"], np.random.default_rng(1)) == (
        "<image>\nPlease segment the cat, dog and car in this image.",
        "[SEG], [SEG] and [SEG].",
    )
    inst = [{"category_name": "Apple", "rephrased_name": "the red apple"}, {"category_name": "dog"}]
    assert T.muse_answer(inst, None, np.random.default_rng(0)) == "the red apple, dog are [SEG] and [SEG], separately."


def test_seeded_turns_are_deterministic_and_consistent():
    names = ["a", "b", "c"]
    outs = [T.segmentation_turn(names, np.random.default_rng(7)) for _ in range(2)]
    assert outs[0] == outs[1]
    for seed in range(40):
        q, a = T.segmentation_turn(names, np.random.default_rng(seed))
        assert a.count(SEG_PLACEHOLDER) == 3 and "a, b and c" in q


def test_allocate():
    for seed in range(30):
        rng = np.random.default_rng(seed)
        items = list(range(int(rng.integers(1, 10))))
        groups = T.allocate(items, rng, 3, 3)
        assert len(groups) == min(3, len(items))
        assert sorted(x for g in groups for x in g) == items
        assert all(1 <= len(g) <= 3 for g in groups)
    with pytest.raises(ValueError):
        T.allocate(list(range(10)), np.random.default_rng(0), 3, 3)


def test_sample_targets_limits():
    groups = T.sample_targets(list(range(20)), np.random.default_rng(0), 3, 2)
    picked = [x for g in groups for x in g]
    assert len(picked) == 6 == len(set(picked)) and len(groups) == 3


def test_referring_eval():
    assert T.referring_eval_turn(" the man ") == (
        "<image>\n What is the man in this image? Please output segmentation mask.",
        "[SEG].",
    )
    assert T.referring_eval_turn("Find it.", is_sentence=True) == (
        "<image>\n Find it. Please output segmentation mask.",
        "[SEG].",
    )


def test_multi_referring_eval():
    assert [len(r) for r in T.multi_referring_groups(17)] == [6, 5, 4, 2]
    assert [len(r) for r in T.multi_referring_groups(16)] == [6, 5, 4, 1]
    assert [list(r) for r in T.multi_referring_groups(3)] == [[0, 1, 2]]
    assert T.multi_referring_eval_turn(["a", " b", "c "]) == (
        "<image>\n What is a, b and c in this image? Please output segmentation mask.",
        "[SEG], [SEG] and [SEG].",
    )
    assert T.multi_referring_eval_turn(["a"]) == (
        "<image>\n What is a in this image? Please output segmentation mask.",
        "[SEG]",  # official quirk: no period for a group of one
    )


def test_muse_question_and_text_answers():
    assert T.muse_question("Which fruit is ripe?", ScriptedRng(integers=[1])) == (
        "<image>\nWhich fruit is ripe? Please output segmentation mask."
    )
    inst = [{"category_name": "apple"}, {"category_name": "pear"}]
    assert T.muse_answer(inst, "The {seg} and the {seg} are ripe.", ScriptedRng()) == "The [SEG] and the [SEG] are ripe."
    assert T.muse_answer(inst, "Only {seg}.", ScriptedRng()) is None
    assert T.muse_answer(inst, "{seg} {seg} {seg}", ScriptedRng()) is None


def test_muse_composed_answers():
    inst = [{"category_name": "Apple", "rephrased_name": "the red apple"}, {"category_name": "Dog"}]
    rng = ScriptedRng(random=[0.5, 0.5], integers=[1, 0])  # rephrased where present; separate
    assert T.muse_answer(inst, None, rng) == "the red apple is [SEG] and Dog is [SEG]."
    rng = ScriptedRng(random=[0.05, 0.9], integers=[0, 0])  # category name (p=0.1); multi template 0
    assert T.muse_answer(inst, None, rng) == "apple, dog are [SEG] and [SEG], separately."
    rng = ScriptedRng(random=[0.9], integers=[0, 7])
    assert T.muse_answer(inst[:1], None, rng) == "Sure, the segmentation result of the red apple are [SEG], separately."


def test_vqa_turns():
    messages = [
        {"from": "gpt", "value": "dropped"},
        {"from": "human", "value": "What is in the picture?\n<image>"},
        {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "Its colour?"},
        {"from": "gpt", "value": "Black."},
    ]
    assert T.vqa_turns(messages) == [("<image>\nWhat is in the picture?", "A cat."), ("Its colour?", "Black.")]
    with pytest.raises(ValueError, match="unanswered"):
        T.vqa_turns(messages[1:4])
    with pytest.raises(ValueError, match="expected 'gpt'"):
        T.vqa_turns([messages[1], messages[3]])
