"""Hugging Face hub ids as conversion sources: `owner/name[@revision]` -> a local snapshot directory.

A SOURCE, `--clip` or `--tokenizer` that is no existing local path but is spelled like a hub id is
fetched with `huggingface_hub.snapshot_download` into the hub cache, which honours HF_HOME /
HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN as every hub client does; a cached snapshot is used as it
is. Only the files the importers read come down: the JSON files (configs, shard indexes,
tokenizer tables), `tokenizer.model`, and the weights: the files a shard index names, else the
`*.safetensors` files, else the `*.bin` ones (as `readers.checkpoint_files` picks them), never both
formats. A released PixelLM repository keeps its model in `hf_model/`; the snapshot keeps that
layout and `importers.model_directory` finds it as it does for a local directory.

A local path always wins over an id of the same spelling.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pixellm_jax.convert.errors import ConversionError
from pixellm_jax.convert.readers import INDEX_FILES

# owner/name as the hub spells them (letters, digits, - _ .), optionally @revision (branch, tag, commit).
_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
HUB_ID = re.compile(rf"(?P<repo>{_NAME}/{_NAME})(?:@(?P<revision>[A-Za-z0-9_./-]+))?")
COMMIT = re.compile(r"[0-9a-f]{40}")
METADATA = ("*.json", "*tokenizer.model")


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `spec` is spelled like a hub id, else None."""
    m = HUB_ID.fullmatch(spec)
    if m is None or ".." in m.group("repo") or "--" in m.group("repo"):
        return None
    return m.group("repo"), m.group("revision")


def local_or_hub(spec: str | Path | None, *, weights: bool = True) -> tuple[Path | None, str | None]:
    """(`spec` as a local path, None), or (the snapshot of the hub id `spec`, a note saying so).

    An existing path, a `Path`, or a string not spelled like a hub id is returned as a path (a
    missing one fails later, naming it). `weights=False` fetches no weight files (a tokenizer).
    """
    if spec is None:
        return None, None
    if isinstance(spec, Path) or Path(spec).exists() or parse_hub_id(spec) is None:
        return Path(spec), None
    repo, revision = parse_hub_id(spec)
    root = _snapshot(spec, repo, revision, list(METADATA))
    if weights:  # the commit the metadata came from, so a push in between cannot mix two
        commit = root.name if root.parent.name == "snapshots" and COMMIT.fullmatch(root.name) else revision
        root = _snapshot(spec, repo, commit, _weight_patterns(root))
    return root, f"{spec}: hub snapshot {root}"


def _weight_patterns(root: Path) -> list[str]:
    """The weight files to fetch, from the shard index the metadata brought (root or one folder down)."""
    for directory in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        for name in INDEX_FILES:
            index = directory / name
            if index.is_file():
                try:
                    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                except (ValueError, KeyError, TypeError, AttributeError) as e:
                    raise ConversionError(f"{index}: not a valid shard index ({e})") from None
                prefix = "" if directory == root else f"{directory.relative_to(root).as_posix()}/"
                return [prefix + f for f in files]
    return ["*.safetensors"]


def _snapshot(spec: str, repo: str, revision: str | None, patterns: list[str]) -> Path:
    """The snapshot directory of `repo` at `revision` holding (at least) the files of `patterns`."""
    from huggingface_hub import constants, errors, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    where = f"{repo}@{revision}" if revision else repo
    incomplete = getattr(errors, "IncompleteSnapshotError", ())  # huggingface_hub >= 1.x
    try:
        root = Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
        if patterns == ["*.safetensors"] and not any(root.rglob("*.safetensors")):
            root = Path(snapshot_download(repo, revision=revision, allow_patterns=["*.bin"]))
    except GatedRepoError as e:
        raise ConversionError(f"{spec}: no such local file or directory, and the hub repository {repo} is gated: "
                              f"accept its terms on the hub and log in (`hf auth login` or HF_TOKEN) ({e})") from None
    except RepositoryNotFoundError:
        raise ConversionError(f"{spec}: no such local file or directory, and no hub repository {repo} "
                              "(or it is private: log in with `hf auth login` or set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise ConversionError(f"{spec}: the hub repository {repo} has no revision {revision!r}") from None
    except incomplete as e:
        raise ConversionError(f"{spec}: {e}") from None
    except LocalEntryNotFoundError as e:
        if constants.HF_HUB_OFFLINE:
            raise ConversionError(
                f"{spec}: no such local file or directory, and the hub cache ({constants.HF_HUB_CACHE}) has no "
                f"snapshot of {where} while HF_HUB_OFFLINE is set; download it once online "
                "(unset HF_HUB_OFFLINE) or pass a local directory") from None
        cause = e.__cause__ or e
        raise ConversionError(f"{spec}: no such local file or directory, and {where} could not be fetched from "
                              f"the hub and is not in its cache ({constants.HF_HUB_CACHE}): "
                              f"{type(cause).__name__}: {cause}") from None
    except (OSError, ValueError) as e:
        raise ConversionError(f"{spec}: fetching {where} from the hub failed: {type(e).__name__}: {e}") from None
    return root
