"""`pixellm predict` on a folder with unreadable, 16-bit and thin images: the readable ones are predicted,
the others reported per image and at the end; exit 1 only when nothing could be predicted."""

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from pixellm_jax.cli import main
from pixellm_jax.eval import commands
from pixellm_jax.eval.loading import load_for_inference
from tests.eval.tiny import sure_seg_checkpoint

pytestmark = pytest.mark.slow

MAX_NEW = 12
BUCKET = 257


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny checkpoint that always answers "Sure, [SEG].", loaded once."""
    tmp = tmp_path_factory.mktemp("predict")
    sure_seg_checkpoint(tmp)
    return SimpleNamespace(tmp=tmp, loaded=load_for_inference(tmp / "ckpt", [f"data.token_buckets=[{BUCKET}]"]))


@pytest.fixture
def run(env, monkeypatch, capsys):
    """`pixellm predict --image IMAGE` → (exit status, stdout, stderr lines), the model loaded once."""
    monkeypatch.setattr(commands, "load", lambda args: env.loaded)

    def run(image, out):
        args = ["predict", "--checkpoint", str(env.tmp / "ckpt"), "--image", str(image), "--question", "Where?",
                "--out", str(out), "--max-new-tokens", str(MAX_NEW)]
        status = main(args)
        captured = capsys.readouterr()
        return status, captured.out, captured.err.splitlines()

    return run


def write_broken(folder):
    """Two unreadable images: not an image at all, and a truncated PNG."""
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    Image.fromarray(np.full((30, 40, 3), 7, np.uint8)).save(folder / "whole.png")
    data = (folder / "whole.png").read_bytes()
    (folder / "whole.png").unlink()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])


def test_folder_goes_on_past_bad_images(env, run):
    folder = env.tmp / "mixed"
    folder.mkdir()
    write_broken(folder)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(folder / "good.png")
    Image.fromarray(np.full((30, 40), 128 * 257, np.uint16)).save(folder / "deep.png")  # 16-bit grey 128
    Image.fromarray(np.full((1, 300, 3), 200, np.uint8)).save(folder / "thin.png")  # resizes to 1x56 at 56
    out = env.tmp / "mixed_out"
    status, printed, errors = run(folder, out)
    assert status == 0
    assert printed.count("Sure, [1].") == 3
    assert errors[0].startswith(f"{folder / 'broken.jpg'}: skipped: cannot decode image")
    assert errors[1].startswith(f"{folder / 'truncated.png'}: skipped: cannot decode image")
    assert errors[2:] == ["2 of 5 images skipped: broken.jpg, truncated.png"]
    for stem, (h, w) in {"good": (30, 40), "deep": (30, 40), "thin": (1, 300)}.items():
        with Image.open(out / f"{stem}_overlay.png") as im:
            assert im.size == (w, h)
    assert not (out / "broken_overlay.png").exists() and not (out / "truncated_overlay.png").exists()
    with Image.open(out / "deep_overlay.png") as im, Image.open(out / "deep_mask_1.png") as mask:
        untinted = np.asarray(im)[np.asarray(mask) == 0]
    assert np.median(untinted) == 128  # scaled from 16 bits, not clipped to white


def test_nothing_readable_exits_1(env, run):
    folder = env.tmp / "all_bad"
    folder.mkdir()
    write_broken(folder)
    status, printed, errors = run(folder, env.tmp / "all_bad_out")
    assert status == 1 and printed == ""
    assert [e.split(": skipped: ")[0] for e in errors[:2]] == [str(folder / "broken.jpg"), str(folder / "truncated.png")]
    assert errors[2:] == ["pixellm predict: no image could be predicted: 2 of 2 images skipped: broken.jpg, truncated.png"]


def test_one_bad_image_is_one_line(env, run):
    folder = env.tmp / "one"
    folder.mkdir()
    write_broken(folder)
    status, printed, errors = run(folder / "broken.jpg", env.tmp / "one_out")
    assert status == 1 and printed == ""
    assert len(errors) == 1 and errors[0].startswith(f"pixellm predict: cannot decode image {folder / 'broken.jpg'}: ")
    status, _, errors = run(folder / "missing.png", env.tmp / "one_out")
    assert status == 1 and errors == [f"pixellm predict: {folder / 'missing.png'}: no such image or folder"]
