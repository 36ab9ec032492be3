"""`pixellm convert owner/name --clip owner/name`: hub ids resolved through the Hugging Face cache.

A tiny release and CLIP are laid out as the hub cache stores them (`models--owner--name/` with
`refs/main`, `snapshots/<commit>/` of links into `blobs/`), read offline (HF_HUB_OFFLINE=1) from
HF_HUB_CACHE. huggingface_hub reads both variables when it is imported, so in this process its
`constants` are patched as well; the subprocess at the end gets them from its environment only.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pixellm_jax.cli import main
from pixellm_jax.convert.checkpoint import load_pretrained, model_params
from pixellm_jax.convert.errors import ConversionError
from pixellm_jax.convert.hub import local_or_hub, parse_hub_id
from tests.convert import fixtures as fx

RELEASE, CLIP = "maverickrzw/PixelLM-7B", "openai/clip-vit-large-patch14-336"
REPO_ROOT = Path(__file__).resolve().parents[2]


def cache_repo(cache: Path, repo: str, files: Path, revision: str = "main") -> str:
    """`files` as the snapshot of `repo` in the hub cache layout; returns the snapshot's commit."""
    commit = hashlib.sha1(repo.encode()).hexdigest()
    storage = cache / f"models--{repo.replace('/', '--')}"
    for path in sorted(p for p in files.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / path.relative_to(files)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / revision).write_text(commit)  # no newline, as the hub writes it
    return commit


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub_ids")
    fx.write_pixellm_release(root / "local" / "PixelLM-7B")  # hf_model/ inside, as released
    fx.write_clip(root / "local" / "clip")
    cache = (root / "cache").resolve()
    commits = {RELEASE: cache_repo(cache, RELEASE, root / "local" / "PixelLM-7B"),
               CLIP: cache_repo(cache, CLIP, root / "local" / "clip")}
    return root, cache, commits


@pytest.fixture
def offline(hub, monkeypatch, tmp_path):
    from huggingface_hub import constants

    _, cache, _ = hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # no local folder is spelled like the ids
    return hub


def test_hub_id_spelling():
    assert parse_hub_id(RELEASE) == (RELEASE, None)
    assert parse_hub_id(f"{RELEASE}@v1.0") == (RELEASE, "v1.0")
    assert parse_hub_id(f"{CLIP}@refs/pr/3") == (CLIP, "refs/pr/3")
    for path in ("ckpt", "./ckpt/PixelLM-7B", "/abs/PixelLM-7B", "a/b/c", "a/../b", "-a/b", "a--b/c", "a/b@"):
        assert parse_hub_id(path) is None, path


def test_local_paths_win_over_ids(offline, tmp_path):
    local = tmp_path / CLIP
    local.mkdir(parents=True)
    assert local_or_hub(CLIP) == (Path(CLIP), None)  # an existing relative path: no hub look-up
    assert local_or_hub("not/here/either") == (Path("not/here/either"), None)  # not an id: fails later as a path


def test_snapshot_revisions_and_subfolder(offline):
    _, cache, commits = offline
    snapshot = cache / "models--maverickrzw--PixelLM-7B" / "snapshots" / commits[RELEASE]
    assert local_or_hub(RELEASE) == (snapshot, f"{RELEASE}: hub snapshot {snapshot}")
    assert local_or_hub(f"{RELEASE}@{commits[RELEASE]}")[0] == snapshot
    assert local_or_hub(RELEASE, weights=False)[0] == snapshot
    assert (snapshot / "hf_model" / "pytorch_model.bin.index.json").is_file()  # found by model_directory
    with pytest.raises(ConversionError, match=rf"{RELEASE}@v2: .*no snapshot of {RELEASE}@v2 .*HF_HUB_OFFLINE"):
        local_or_hub(f"{RELEASE}@v2")


def test_convert_from_hub_ids_equals_local_dirs(offline, capsys):
    root, _, commits = offline
    common = ["--config", "tiny", "--no-progress"]
    assert main(["convert", RELEASE, "--clip", CLIP, "--out", str(root / "from_hub"), *common]) == 0
    printed = capsys.readouterr().out
    assert f"note: {RELEASE}: hub snapshot " in printed and f"snapshots/{commits[CLIP]}" in printed
    local = root / "local"
    assert main(["convert", str(local / "PixelLM-7B"), "--clip", str(local / "clip"),
                 "--out", str(root / "from_dirs"), *common]) == 0

    hub_ckpt, dir_ckpt = load_pretrained(root / "from_hub"), load_pretrained(root / "from_dirs")
    assert (root / "from_hub" / "config.yaml").read_text() == (root / "from_dirs" / "config.yaml").read_text()
    got, want = model_params(hub_ckpt.model), model_params(dir_ckpt.model)
    assert set(got) == set(want)
    for path in want:
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(want[path]), err_msg=path)
    for name in ("added_tokens.json", "tokenizer.model"):
        assert (hub_ckpt.tokenizer_dir / name).read_bytes() == (dir_ckpt.tokenizer_dir / name).read_bytes()
    shutil.rmtree(root / "from_dirs")


def test_unknown_id_offline_fails_clearly_in_a_fresh_process(hub, tmp_path):
    """Only the environment tells huggingface_hub where the cache is and that it is offline."""
    _, cache, _ = hub
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(REPO_ROOT)}
    script = (
        "import sys\n"
        "from pixellm_jax.cli import main\n"
        f"assert main(['convert', {RELEASE!r}, '--clip', {CLIP!r}, '--config', 'tiny', '--dry-run']) == 0\n"
        f"sys.exit(main(['convert', 'nobody/missing-model', '--clip', {CLIP!r}, '--out', 'out']))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"note: {RELEASE}: hub snapshot {cache}" in done.stdout
    (line,) = [ln for ln in done.stderr.splitlines() if ln.startswith("pixellm convert:")]
    assert "nobody/missing-model" in line and f"the hub cache ({cache}) has no snapshot" in line
    assert "HF_HUB_OFFLINE is set" in line and not (tmp_path / "out").exists()
