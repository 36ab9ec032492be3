"""The inference API: `Predictor` gives `pixellm predict`'s answers and masks, takes in-memory images,
and `intermediates` exposes every stage of the teacher-forced forward consistently with the model."""

import numpy as np
import pytest
from PIL import Image

from pixellm_jax.cli import main
from pixellm_jax.predictor import Predictor, UnusableImage
from tests.eval.tiny import sure_seg_checkpoint

pytestmark = pytest.mark.slow

OVERRIDES = ["data.token_buckets=[257]"]
MAX_NEW = 12


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny checkpoint that always answers "Sure, [SEG].", an image file, and its Predictor."""
    from pixellm_jax.eval.generate import SamplingConfig

    tmp = tmp_path_factory.mktemp("predictor")
    sure_seg_checkpoint(tmp)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 52, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp / "photo.png")
    predictor = Predictor.from_checkpoint(tmp / "ckpt", OVERRIDES, sampling=SamplingConfig(max_new_tokens=MAX_NEW))
    return dict(tmp=tmp, image=image, predictor=predictor)


def test_predict_equals_the_command(env, capsys):
    tmp = env["tmp"]
    result = env["predictor"].predict(tmp / "photo.png", "Where is it?")
    assert result.answer == "Sure, [1]." and result.masks.shape == (1, 37, 52)
    status = main(["predict", "--checkpoint", str(tmp / "ckpt"), *OVERRIDES, "--image", str(tmp / "photo.png"),
                   "--question", "Where is it?", "--out", str(tmp / "cli"), "--max-new-tokens", str(MAX_NEW)])
    assert status == 0
    assert f"photo.png: {result.answer}" in capsys.readouterr().out
    cli_mask = np.asarray(Image.open(tmp / "cli" / "photo_mask_1.png")) > 0
    np.testing.assert_array_equal(cli_mask, result.masks[0])


def test_in_memory_images_give_the_same_prediction(env):
    predictor, image = env["predictor"], env["image"]
    from_file = predictor.predict(env["tmp"] / "photo.png", "Where is it?")
    from_array, from_pil = predictor.predict_many([image, Image.fromarray(image)], "Where is it?")
    for got in (from_array, from_pil):
        assert got.answer == from_file.answer
        np.testing.assert_array_equal(got.masks, from_file.masks)
        np.testing.assert_array_equal(got.image, image)


def test_unusable_images_are_named(env):
    with pytest.raises(UnusableImage, match=r"image_0: .*uint8.*float32"):
        env["predictor"].predict(np.zeros((8, 8, 3), np.float32), "Where?")
    with pytest.raises(UnusableImage, match="missing.png"):
        env["predictor"].predict(env["tmp"] / "missing.png", "Where?")


def test_intermediates_are_the_model_forward(env):
    import jax.numpy as jnp

    predictor, image = env["predictor"], env["image"]
    stages = predictor.intermediates(image, "Where is it?", "Sure, [SEG].")
    cfg = predictor.loaded.config.model
    grid, n_img = cfg.vision.grid, cfg.projector.llm_grid ** 2
    assert [f.shape for f in stages.decoder_features] == [(1, grid, grid, cfg.head.out_dim)] * cfg.head.scale_num
    assert stages.image_tokens.shape == (1, n_img, cfg.text.hidden_size)
    assert stages.hidden_states.shape[:2] == stages.logits.shape[:2] == stages.token_ids.shape
    assert int(stages.num_targets[0]) == 1
    assert stages.seg_embeddings.shape[2:] == (cfg.head.scale_num, cfg.head.out_dim)
    assert stages.masks.shape[2:] == (37, 52)
    # the same forward through the model's own call (what training and validation run)
    from pixellm_jax.data.conversation import tokenize_training
    from pixellm_jax.data.transforms import preprocess_image

    prepared = preprocess_image(image, cfg.vision.image_size)
    ids = tokenize_training(predictor.loaded.legacy, [("<image>\nWhere is it?", "Sure, [SEG].")], 1 << 20).input_ids
    out = predictor.loaded.model(jnp.asarray(prepared.pixels[None]), jnp.asarray([prepared.resized_hw]),
                                 jnp.asarray(ids[None]), jnp.ones((1, len(ids)), bool), jnp.zeros((1,), jnp.int32))
    np.testing.assert_allclose(stages.logits, np.asarray(out.logits), atol=1e-5)
    np.testing.assert_allclose(stages.low_res_masks, np.asarray(out.mask_logits), atol=1e-5)
    # teacher-forcing the generated answer gives the generated masks
    generated = predictor.predict(image, "Where is it?")
    agree = np.mean((stages.masks[0, 0] > 0) == generated.masks[0])
    assert agree > 0.999, agree


def test_readme_example_runs(env, capsys):
    """The README's Predict example, on the tiny checkpoint and image (paths substituted)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Predict\n"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "Predictor.from_checkpoint" in code
    code = code.replace('"runs/demo/model"', repr(str(env["tmp"] / "ckpt")) + ", " + repr(OVERRIDES))
    code = code.replace('"photo.jpg"', repr(str(env["tmp"] / "photo.png")))
    exec(compile(code, "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Sure, [1]." and lines[1] == "(1, 37, 52)"
