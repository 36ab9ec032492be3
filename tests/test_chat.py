"""`pixellm chat`: the terminal loop (bad paths, numbered answers, per-turn files, /new, /quit) and the
multi-turn prompt: each turn after the first is generated after the earlier questions and the answers
as generated (codebook tokens included), "<image>" in the first question only."""

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixellm_jax.chat import chat, conversation_stem
from pixellm_jax.data.conversation import tokenize_generation
from pixellm_jax.eval.loading import legacy_tokenizer
from pixellm_jax.eval.predict import BadQuestion, chat_prompt
from tests.eval.tiny import tiny_config, tiny_tokenizer, sure_seg_checkpoint

OVERRIDES = ["data.token_buckets=[257]"]
MAX_NEW = 12
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    hf, seg = tiny_tokenizer(tmp_path_factory.mktemp("chat_tok") / "tok")
    return hf, seg, legacy_tokenizer(hf, tiny_config(hf, seg))


@pytest.fixture(scope="module")
def env(tmp_path_factory, tok):
    """A tiny checkpoint that always answers "Sure, [SEG].", two images, and a Predictor shaped as chat's."""
    from pixellm_jax.eval.generate import SamplingConfig
    from pixellm_jax.predictor import Predictor

    tmp = tmp_path_factory.mktemp("chat")
    *_, answer = sure_seg_checkpoint(tmp)  # the tokenizer `tok` builds the same way
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (37, 52, 3), dtype=np.uint8)).save(tmp / "photo.png")
    Image.fromarray(rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)).save(tmp / "second.png")
    predictor = Predictor.from_checkpoint(tmp / "ckpt", OVERRIDES, images_per_batch=1, rows_per_batch=1,
                                          sampling=SamplingConfig(max_new_tokens=MAX_NEW))
    return dict(tmp=tmp, answer=answer, predictor=predictor)


def session(env):
    tmp = env["tmp"]
    return f"bad/path.png\n{tmp / 'photo.png'}\nWhere is it?\nAnd now?\n/new\n{tmp / 'second.png'}\nWhat?\n/quit\n"


@pytest.mark.slow
def test_chat_command_session(env):
    tmp, out = env["tmp"], env["tmp"] / "cli_out"
    environ = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    done = subprocess.run([sys.executable, "-m", "pixellm_jax.cli", "chat", "--checkpoint", str(tmp / "ckpt"),
                           *OVERRIDES, "--out", str(out), "--max-new-tokens", str(MAX_NEW)],
                          input=session(env), capture_output=True, text=True, env=environ, cwd=tmp, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout
    assert "Traceback" not in done.stderr
    assert "Image path: cannot use this image: image file not found: bad/path.png\nImage path: " in printed
    assert printed.count("Question: Sure, [1].\n") == 3
    files = {"photo_turn1", "photo_turn2", "second_turn1"}
    for name in files:
        for suffix in ("overlay", "mask_1"):
            assert str(out / f"{name}_{suffix}.png") in printed
    assert {p.name for p in out.iterdir()} == {f"{n}_{s}.png" for n in files for s in ("overlay", "mask_1")}
    with Image.open(out / "second_turn1_overlay.png") as im:
        assert im.size == (20, 30)
    assert printed.endswith("Question: ")  # /quit at the question prompt


@pytest.mark.slow
def test_history_is_fed_to_the_next_turn(env, tok, monkeypatch):
    """Turn 2's prompt holds turn 1's question (with the image) and its answer as generated, codebook ids
    included; /new starts a fresh conversation; `Predictor.predict(..., history=...)` gives turn 2 again."""
    hf, seg, legacy = tok
    predictor, answer = env["predictor"], env["answer"]
    prompts, preds = [], []
    generate, predict = predictor.runner.generate, predictor.predict

    def spy_generate(batch, *args, **kwargs):
        prompts.append(batch.items[0].input_ids)
        return generate(batch, *args, **kwargs)

    def spy_predict(*args, **kwargs):
        preds.append(predict(*args, **kwargs))
        return preds[-1]

    monkeypatch.setattr(predictor.runner, "generate", spy_generate)
    monkeypatch.setattr(predictor, "predict", spy_predict)
    stdout = io.StringIO()
    chat(predictor, env["tmp"] / "loop_out", io.StringIO(session(env)), stdout)
    monkeypatch.undo()

    raw1 = hf.decode(answer, skip_special_tokens=False)  # the model's output text, codebook tokens in it
    assert [p.answer for p in preds] == ["Sure, [1]."] * 3 and [p.raw_answer for p in preds] == [raw1] * 3
    assert legacy.encode_chunk(raw1) == answer  # fed back, the text gives the generated ids again
    np.testing.assert_array_equal(prompts[0], tokenize_generation(legacy, "<image>\nWhere is it?"))
    expected = tokenize_generation(legacy, "And now?", history=[("<image>\nWhere is it?", raw1)])
    np.testing.assert_array_equal(prompts[1], expected)
    text = list(prompts[1])
    start = next(i for i in range(len(text)) if text[i: i + len(answer)] == answer)
    assert text[start + len(answer)] == legacy.eos_id  # the answer's ids, closed by </s>
    assert np.isin(prompts[1], seg).sum() == len(seg) and list(prompts[1]).count(-200) == 1
    np.testing.assert_array_equal(prompts[2], tokenize_generation(legacy, "<image>\nWhat?"))  # after /new

    again = predictor.predict(env["tmp"] / "photo.png", "And now?", history=[("Where is it?", raw1)])
    assert again.answer == preds[1].answer and again.raw_answer == preds[1].raw_answer
    np.testing.assert_array_equal(again.masks, preds[1].masks)
    with Image.open(env["tmp"] / "loop_out" / "photo_turn2_mask_1.png") as mask:
        np.testing.assert_array_equal(np.asarray(mask) > 0, again.masks[0])


def test_codebook_token_strings_map_to_their_ids(tok):
    hf, seg, legacy = tok
    assert [legacy.encode_chunk(f"[SEG{i}]") for i in range(len(seg))] == [[s] for s in seg]
    ids = legacy.encode_chunk("is [SEG0] [SEG1][SEG2]x")
    assert ids == legacy.encode_piece("is") + seg[:3] + legacy.encode_piece("x")


def test_chat_prompt_places_the_image_in_the_first_turn(tok):
    legacy = tok[2]
    np.testing.assert_array_equal(chat_prompt(legacy, "Q?"), tokenize_generation(legacy, "<image>\nQ?"))
    history = [("Q1?", "A1 [SEG]."), ("Q2?", "A2.")]
    np.testing.assert_array_equal(
        chat_prompt(legacy, "Q3?", history),
        tokenize_generation(legacy, "Q3?", [("<image>\nQ1?", "A1 [SEG]."), ("Q2?", "A2.")]))
    with pytest.raises(BadQuestion, match="<image>"):
        chat_prompt(legacy, "Q?", [("<image>\nQ1?", "A1.")])


def test_conversation_stem_never_reuses_files(tmp_path):
    assert conversation_stem(tmp_path, "photo") == "photo"
    (tmp_path / "photo_turn1_overlay.png").write_bytes(b"")
    (tmp_path / "photo-2_turn3_mask_1.png").write_bytes(b"")
    assert conversation_stem(tmp_path, "photo") == "photo-3"
    assert conversation_stem(tmp_path, "ph[o]to") == "ph[o]to"
