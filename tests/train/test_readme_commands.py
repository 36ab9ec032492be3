"""The README and docs/ are the contract: every `pixellm` command they show is run here as written,
from a fresh working directory with relative paths (training shortened by overrides appended to it),
in the order README.md, docs/TRAINING.md, docs/DATA.md, docs/CONVERSION.md, docs/EVALUATION.md, then
any other doc, or is listed in `NEEDS_REAL_DATA` / `RUN_ELSEWHERE` with the reason. A command added to
them without an entry here fails.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixellm_jax.cli import main as cli_main
from tests.convert import fixtures as fx
from tests.data.test_refer import write_refer
from tests.muse_layout import write_muse_layout
from tests.train.conftest import TOY

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
FIRST_DOCS = ("TRAINING.md", "DATA.md", "CONVERSION.md", "EVALUATION.md")
# The data each command names stay (the demo's files, the user's): three questions per image fit in
# six conversation slots of two images.
SHORT_TRAIN = [*TOY, "train.steps=2", "train.eval_every=2", "train.eval_batches=1", "train.save_every=2",
               "train.overlays=1", "data.conversations_per_batch=6"]
# The demo's held-out splits, cut to a few records (generated answers at random weights run to the
# length limit).
DEMO_DATA = "runs/demo_data"
SHORT_DEMO_VAL = [f"data.val=['muse_val=muse:json={DEMO_DATA}/muse_val.json,images={DEMO_DATA}/images,limit=3', "
                  f"'refer_val=muse:json={DEMO_DATA}/refer_val.json,images={DEMO_DATA}/images,protocol=teacher_forced,limit=3']"]
SHORT_INFERENCE = ["--max-new-tokens", "16", "--images-per-batch", "2", "--rows-per-batch", "2"]
TINY_CONVERT = ["--config", "tiny", "--no-progress"]  # the fixtures are tiny releases, not 7B ones

# Inline code spans that show a command's syntax, not a command to run.
SYNOPSES = {"pixellm train --config CONFIG [section.field=value ...]", "pixellm --debug ...", "pixellm eval --split"}
NEEDS_REAL_DATA = {
    "pixellm train --config pixellm_7b": "a converted LLaVA-7B base and the official datasets",
    "pixellm prepare-data --source refcoco": "tests/data/test_tfds.py prepares REFER fixtures (needs TensorFlow)",
    "pixellm convert maverickrzw/PixelLM-7B": "the released 7B and CLIP from the Hugging Face hub (network); "
                                              "tests/convert/test_hub_ids.py converts tiny ones from a hub cache",
}

# Interactive commands: each is started as written (paths substituted) by its own test.
RUN_ELSEWHERE = {
    "pixellm serve": "tests/test_serve.py starts it on a tiny checkpoint and drives it in headless Chromium",
    "pixellm chat": "tests/test_chat.py runs it on a tiny checkpoint with questions on stdin",
}


def documents() -> list[Path]:
    """README.md, then the docs in the order their commands depend on each other."""
    rest = sorted(p for p in (ROOT / "docs").glob("*.md") if p.name not in FIRST_DOCS)
    return [README, *(ROOT / "docs" / name for name in FIRST_DOCS), *rest]


def readme_commands() -> list[str]:
    """Every `pixellm ...` command of the README and docs/, each once: lines of their bash blocks (with
    continuations and without comments) and inline code spans that pass options."""
    commands: list[str] = []
    for path in documents():
        for command in document_commands(path.read_text()):
            if command not in commands:
                commands.append(command)
    return commands


def document_commands(text: str) -> list[str]:
    """The `pixellm ...` commands of one Markdown text."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line.startswith("pixellm "):
                commands.append(" ".join(line.split()))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`(pixellm [^`\s]+ [^`]+)`", prose):
        span = " ".join(span.split())
        if span not in commands and span not in SYNOPSES:
            commands.append(span)
    return commands


def _prepare_inputs(root: Path) -> None:
    """What the README's examples read, written where they say (relative to the working directory)."""
    write_muse_layout(root / "my_data", "train", records=10, seed=0, images="images")
    write_muse_layout(root / "my_data", "val", records=4, seed=1, images="images")
    write_muse_layout(root / "data", "muse_val", records=3, seed=2, images="coco")
    write_refer(root / "data" / "refer_seg", extra_sents=3)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(root / "photo.jpg")
    fx.write_pixellm_release(root / "ckpt" / "PixelLM-7B")
    fx.write_clip(root / "ckpt" / "clip-vit-large-patch14-336")
    fx.write_llava(root / "ckpt" / "LLaVA-Lightning-7B-v1-1", "mlp2x_gelu")
    fx.write_llava_hf(root / "ckpt" / "llava-1.5-7b-hf")


def _extra(argv: list[str]) -> list[str]:
    """The shortening overrides of one command."""
    command = argv[1]
    if command == "train":
        demo_data = argv[2:4] == ["--config", "demo"] and not any(a.startswith("data.val=") for a in argv)
        return SHORT_TRAIN + (SHORT_DEMO_VAL if demo_data else [])
    if command == "eval":
        return [*SHORT_INFERENCE, "--no-progress"]
    if command == "predict":
        return SHORT_INFERENCE
    if command == "convert":
        return TINY_CONVERT
    if command == "export":
        return ["--no-progress"] if "peft" not in argv else []
    return []


def _check_outputs(cwd: Path) -> None:
    demo = cwd / "runs" / "demo"
    assert (demo / "model" / "params").is_dir() and (demo / "overlays" / "overlay_00.png").is_file()
    summary = json.loads((demo / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["heldout_splits"] == ["muse_val", "refer_val"]
    assert "muse_val/exact_targets" in summary["eval_metrics"] and "muse_val/baseline_giou" in summary["eval_metrics"]
    assert "\nReference: " in json.loads((demo / "overlays" / "index.json").read_text())[0]["text"]
    mine = json.loads((cwd / "runs" / "mine" / "summary.json").read_text())
    assert mine["heldout_splits"] == ["val"] and "val/giou" in mine["eval_metrics"]
    assert (cwd / "my_tok" / "tokenizer.model").is_file()
    multi = json.loads((cwd / "runs" / "demo_eval" / "metrics.json").read_text())["muse"]  # docs/MULTI_TARGET.md
    assert multi["questions"] == 450 and multi["baseline_giou"] > 0 and multi["exact_targets"] is not None
    metrics = json.loads((cwd / "results" / "metrics.json").read_text())
    assert set(metrics) == {"refcoco_val", "multi", "muse"} and metrics["muse"]["rows"] > 0
    assert (cwd / "pred" / "photo_overlay.png").is_file()
    for directory in ("ckpt/pixellm-7b", "ckpt/base", "ckpt/llava15"):
        assert (cwd / directory / "params").is_dir(), directory
    assert list((cwd / "out" / "hf_model").glob("pytorch_model*.bin"))
    assert (cwd / "out" / "llava-hf").is_dir() and (cwd / "out" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.heavy  # ~5 min on 2 cores: run in CI after the default suite
def test_every_readme_command_runs_as_written(tmp_path, monkeypatch, compile_cache):
    commands = readme_commands()
    assert len(commands) >= 15, commands
    cwd = tmp_path / "fresh"
    (cwd / "demo").mkdir(parents=True)  # a folder named like the config must not shadow it
    _prepare_inputs(cwd)
    monkeypatch.chdir(cwd)
    ran = []
    for command in commands:
        if any(command.startswith(prefix) for prefix in (*NEEDS_REAL_DATA, *RUN_ELSEWHERE)):
            continue
        argv = shlex.split(command)
        code = cli_main(argv[1:] + _extra(argv))
        assert code == 0, f"README command failed ({code}): {command}"
        ran.append(command)
    assert {c.split()[1] for c in ran} >= {"train", "build-tokenizer", "eval", "predict", "convert", "export",
                                           "describe", "checkpoints"}
    _check_outputs(cwd)
