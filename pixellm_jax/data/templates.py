"""Question and answer templates of the official PixelLM data (reference §2.7), and their composition.

The template strings are the official ones (utils/utils.py), with the official target placeholder
"[SEG]" standing for one target's codebook-token group: `SEG_PLACEHOLDER` is that same string, and
tokenisation later expands each occurrence into the N·L codebook tokens. Every question starts with
"<image>\\n". All randomness comes from the `np.random.Generator` passed in, so a source's sample is
a function of its index and generator state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np

from pixellm_jax.data.sample import IMAGE_PLACEHOLDER, SEG_PLACEHOLDER

T = TypeVar("T")

_Q = IMAGE_PLACEHOLDER + "\n"

SHORT_QUESTION_LIST: tuple[str, ...] = (
    _Q + "Can you segment the {class_name} in this image?",
    _Q + "Please segment the {class_name} in this image.",
    _Q + "What is {class_name} in this image? Please respond with segmentation mask.",
    _Q + "What is {class_name} in this image? Please output segmentation mask.",
)

# Appended to SHORT_QUESTION_LIST with --use_expand_question_list. "asegment" is the official spelling.
EXPAND_QUESTION_LIST: tuple[str, ...] = (
    _Q + "Could you identify the {class_name} in this picture?",
    _Q + "Are you able to delineate the {class_name} in the image?",
    _Q + "Can you pinpoint the {class_name} in this photo?",
    _Q + "Is it possible for you to highlight the {class_name} in this image?",
    _Q + "Can you discern the {class_name} in the given picture?",
    _Q + "Can you provide me with asegment of the {class_name}?",
    _Q + "Please perform image segmentation to isolate the {class_name} in this image.",
    _Q + "Help me segment the {class_name}.",
    _Q + "Would you be willing to segment the {class_name}?",
    _Q + "Can you identify {class_name} in this picture? Please provide a segmentation mask.",
    _Q + "Could you point out {class_name} in this image and show it with a segmentation mask?",
    _Q + "In this image, where is {class_name}? I'd appreciate a segmentation mask.",
    _Q + "Please highlight {class_name} in this image using a segmentation mask.",
    _Q + "In the picture provided, can you show where {class_name} is with a segmentation mask?",
)

LONG_QUESTION_LIST: tuple[str, ...] = (
    _Q + "{sent} Please respond with segmentation mask.",
    _Q + "{sent} Please output segmentation mask.",
)

EXPAND_LONG_QUESTION_LIST: tuple[str, ...] = (
    _Q + "{sent} Provide the segmentation mask.",
    _Q + "{sent} Output the segmentation mask.",
    _Q + "{sent} Please show the segmentation mask.",
    _Q + "{sent} I'd appreciate segmentation masks.",
    _Q + "{sent} Please highlight the segmentation mask.",
)

ANSWER_LIST: tuple[str, ...] = (
    "It is [SEG].",
    "Sure, [SEG].",
    "Sure, it is [SEG].",
    "Sure, the segmentation result is [SEG].",
    "[SEG].",
)

SINGLE_ANSWER_LIST: tuple[str, ...] = (
    "{class_name} is [SEG].",
    "The segmentation result of {class_name} is [SEG].",
    "[SEG].",
)

MULTI_ANSWER_LIST: tuple[str, ...] = (
    "{class_name} are {seg}, separately.",
    "{class_name} are {seg}.",
    "Sure, {class_name} are {seg}, separately.",
    "Sure, {class_name} are {seg}.",
    "the segmentation result of {class_name} are {seg}.",
    "the segmentation result of {class_name} are {seg}, separately.",
    "Sure, the segmentation result of {class_name} are {seg}.",
    "Sure, the segmentation result of {class_name} are {seg}, separately.",
    "Sure, they are {seg}.",
    "They are {seg}.",
    "{seg}.",
)

MR_SINGLE_ANSWER_LIST: tuple[str, ...] = ("{class_name} is [SEG].",)

MR_MULTI_ANSWER_LIST: tuple[str, ...] = MULTI_ANSWER_LIST[:8]

# Multi-referring evaluation: sentences of an image are grouped in chunks of these sizes, cycling.
MULTI_REFERRING_GROUP_SIZES: tuple[int, ...] = (6, 5, 4)


def short_question_list(expand: bool = False, official_duplicate: bool = False) -> tuple[str, ...]:
    """SHORT_QUESTION_LIST, optionally extended with EXPAND_QUESTION_LIST.

    `official_duplicate` reproduces §10.13: the official semantic and referring datasets each extend
    the shared module-level list, so with both in the mixture the expansion is appended twice, which
    doubles the weight of the expanded templates in random choices.
    """
    if not expand:
        return SHORT_QUESTION_LIST
    return SHORT_QUESTION_LIST + EXPAND_QUESTION_LIST * (2 if official_duplicate else 1)


def long_question_list(expand: bool = False) -> tuple[str, ...]:
    """LONG_QUESTION_LIST (MUSE, reasoning), optionally extended with EXPAND_LONG_QUESTION_LIST."""
    return LONG_QUESTION_LIST + (EXPAND_LONG_QUESTION_LIST if expand else ())


def join_and(parts: Sequence[str]) -> str:
    """"a", "a and b", "a, b and c": the official way of listing targets."""
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def allocate(items: Sequence[T], rng: np.random.Generator, max_questions: int, max_per_question: int) -> list[list[T]]:
    """Distributes items over min(max_questions, len(items)) questions (official `allocate_class`).

    Items are taken in a random order; each goes to a random question that is still empty, or,
    once none is empty, to a random question with fewer than `max_per_question` items.
    """
    n_questions = min(max_questions, len(items))
    if len(items) > n_questions * max_per_question:
        raise ValueError(f"{len(items)} items do not fit {n_questions} questions of {max_per_question}")
    groups: list[list[T]] = [[] for _ in range(n_questions)]
    counts = np.zeros(n_questions, dtype=np.int64)
    for i in rng.permutation(len(items)):
        free = np.flatnonzero(counts == 0)
        if free.size == 0:
            free = np.flatnonzero(counts < max_per_question)
        q = int(rng.choice(free))
        counts[q] += 1
        groups[q].append(items[int(i)])
    return groups


def sample_targets(
    items: Sequence[T], rng: np.random.Generator, num_classes_per_sample: int, num_classes_per_question: int
) -> list[list[T]]:
    """Draws up to num_classes_per_sample·num_classes_per_question items without replacement, then
    allocates them to at most num_classes_per_sample questions (official training sampling)."""
    limit = num_classes_per_sample * num_classes_per_question
    if len(items) > limit:
        picked = [items[int(i)] for i in rng.choice(len(items), size=limit, replace=False)]
    else:
        picked = list(items)
    return allocate(picked, rng, num_classes_per_sample, num_classes_per_question)


def segmentation_turn(
    names: Sequence[str], rng: np.random.Generator, questions: Sequence[str] = SHORT_QUESTION_LIST
) -> tuple[str, str]:
    """One semantic/referring training question about `names` and its answer, one [SEG] per name.

    The question lists the lowercased names ("a, b and c"). One name: an ANSWER_LIST answer.
    Several: with probability 1/2 a SINGLE_ANSWER_LIST template per name (names as written),
    joined ("a is [SEG], b is [SEG] and c is [SEG]."), otherwise a MULTI_ANSWER_LIST answer with
    the lowercased list and "[SEG], [SEG] and [SEG]".
    """
    if not names:
        raise ValueError("a segmentation question needs at least one target")
    target = join_and(list(names)).lower()
    question = _choice(rng, questions).replace("{class_name}", target)
    separate = bool(rng.integers(2))
    if len(names) == 1:
        return question, _choice(rng, ANSWER_LIST)
    if separate:
        template = _choice(rng, SINGLE_ANSWER_LIST)
        parts = [template.replace("{class_name}", name)[:-1] for name in names]
        return question, join_and(parts) + "."
    template = _choice(rng, MULTI_ANSWER_LIST)
    seg = join_and([SEG_PLACEHOLDER] * len(names))
    return question, template.replace("{class_name}", target).replace("{seg}", seg)


def referring_eval_turn(sentence: str, is_sentence: bool = False) -> tuple[str, str]:
    """Single referring evaluation: the fixed question and the teacher-forced answer "[SEG].".

    `is_sentence` gives the ReasonSeg-style question "{sent} Please output segmentation mask.".
    The official text has a space after "<image>\\n" (reference §11.6).
    """
    sentence = sentence.strip()
    if is_sentence:
        question = _Q + f" {sentence} Please output segmentation mask."
    else:
        question = _Q + f" What is {sentence} in this image? Please output segmentation mask."
    return question, SEG_PLACEHOLDER + "."


def multi_referring_groups(n: int) -> list[range]:
    """Consecutive index ranges of sizes 6, 5, 4, 6, 5, 4, ... covering range(n)."""
    groups, start, k = [], 0, 0
    while start < n:
        size = MULTI_REFERRING_GROUP_SIZES[k % len(MULTI_REFERRING_GROUP_SIZES)]
        groups.append(range(start, min(start + size, n)))
        start += size
        k += 1
    return groups


def multi_referring_eval_turn(sentences: Sequence[str]) -> tuple[str, str]:
    """Multi-referring evaluation: "What is t1, t2 ... and tk in this image? ..." and its answer.

    The answer is "[SEG], [SEG] ... and [SEG]." for k > 1; for a group of one sentence the official
    answer is a bare "[SEG]" without the final period, reproduced here.
    """
    texts = [s.strip() for s in sentences]
    question = _Q + f" What is {join_and(texts)} in this image? Please output segmentation mask."
    if len(texts) == 1:
        return question, SEG_PLACEHOLDER
    return question, join_and([SEG_PLACEHOLDER] * len(texts)) + "."


def muse_question(sentence: str, rng: np.random.Generator, questions: Sequence[str] = LONG_QUESTION_LIST) -> str:
    """A MUSE question: a LONG_QUESTION_LIST template around the question text."""
    return _choice(rng, questions).replace("{sent}", sentence)


def muse_answer(instances: Sequence[dict[str, Any]], text_answer: str | None, rng: np.random.Generator) -> str | None:
    """The answer to one MUSE question with one [SEG] per instance, or None when unusable.

    With a `text_answer`, each "{seg}" becomes [SEG]; the answer is unusable (None) when the number
    of "{seg}" differs from the number of instances (issue #6) or the text already holds a [SEG].
    Without one, each target is named by its `rephrased_name` (probability 0.9, when present) or
    its `category_name`; then with probability 1/2 "name is [SEG]" per target, joined, otherwise an
    MR_MULTI_ANSWER_LIST answer with the comma-joined lowercased names.
    """
    if text_answer is not None:
        if text_answer.count("{seg}") != len(instances) or SEG_PLACEHOLDER in text_answer:
            return None
        return text_answer.replace("{seg}", SEG_PLACEHOLDER)
    if not instances:
        return None
    names = [
        inst["rephrased_name"] if (rng.random() > 0.1 and "rephrased_name" in inst) else inst["category_name"]
        for inst in instances
    ]
    seg = join_and([SEG_PLACEHOLDER] * len(names))
    if rng.integers(2):
        template = _choice(rng, MR_SINGLE_ANSWER_LIST)
        return join_and([template.replace("{class_name}", n)[:-1] for n in names]) + "."
    template = _choice(rng, MR_MULTI_ANSWER_LIST)
    return template.replace("{class_name}", ", ".join(names).lower()).replace("{seg}", seg)


def vqa_turns(messages: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """LLaVA-Instruct messages [{from: human|gpt, value}] as (question, answer) turns.

    A leading non-human message is dropped (as officially). Every "<image>" is removed and one is put
    at the front of the first question ("<image>\\n..."). Roles must alternate human/gpt and end
    with an answer; anything else raises ValueError.
    """
    msgs = list(messages)
    if msgs and isinstance(msgs[0], dict) and msgs[0].get("from") != "human":
        msgs = msgs[1:]
    if not msgs:
        raise ValueError("conversation has no human turn")
    values = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("value"), str):
            raise ValueError(f"message {j} is not a {{from, value}} object with a string value")
        expected = "human" if j % 2 == 0 else "gpt"
        if m.get("from") != expected:
            raise ValueError(f"message {j} is from {m.get('from')!r}, expected {expected!r}")
        value = m["value"]
        if IMAGE_PLACEHOLDER in value:
            value = value.replace(IMAGE_PLACEHOLDER, "").strip()
        values.append(value)
    if len(values) % 2:
        raise ValueError("conversation ends with an unanswered human turn")
    values[0] = (_Q + values[0]).strip()
    return [(values[i], values[i + 1]) for i in range(0, len(values), 2)]
