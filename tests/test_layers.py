"""The package's layering: which folders may not import which (read from the source with `ast`).

* `data/` never imports `models/`: the pipeline only needs the shared token ids (`tokens.py`) and the
  batch block layout (`data/blocks.py`), so it loads without JAX model code.
* `convert/` never imports `train/`: conversion builds its mesh from `mesh.py`, not from training.

Every import counts, including ones inside functions and relative ones.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pixellm_jax"
FORBIDDEN = [("data", "models"), ("convert", "train")]


def imported_modules(source: str, module: str) -> set[str]:
    """Every module `source` (the code of `module`, dotted) imports; `from a import b` yields a and a.b."""
    package = module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module
            out.add(name)
            out.update(f"{name}.{alias.name}" for alias in node.names)
    return out


def violations(layer: str, forbidden: str, root: Path = PACKAGE) -> list[str]:
    """`file: module` for each import of `pixellm_jax.<forbidden>` by a module under `<root>/<layer>`."""
    banned = f"pixellm_jax.{forbidden}"
    found = []
    for path in sorted((root / layer).rglob("*.py")):
        relative = path.relative_to(root.parent).with_suffix("")
        module = ".".join(relative.parts)
        if path.name == "__init__.py":
            module += ".__init__"  # relative imports of a package resolve inside it
        for name in sorted(imported_modules(path.read_text(), module)):
            if name == banned or name.startswith(banned + "."):
                found.append(f"{path.relative_to(root.parent)}: {name}")
    return found


@pytest.mark.parametrize("layer, forbidden", FORBIDDEN)
def test_layer_does_not_import(layer, forbidden):
    assert (PACKAGE / layer).is_dir()
    assert violations(layer, forbidden) == [], f"pixellm_jax/{layer} must not import pixellm_jax.{forbidden}"


def test_the_check_sees_every_spelling(tmp_path):
    data = tmp_path / "pixellm_jax" / "data"
    data.mkdir(parents=True)
    (data / "ok.py").write_text("from pixellm_jax.tokens import IMAGE_TOKEN\nimport pixellm_jax.modelsx\n")
    (data / "bad.py").write_text(
        "import pixellm_jax.models.llama\n"
        "from pixellm_jax import models\n"
        "from ..models.codebook import SegGather\n"
        "def lazy():\n    from pixellm_jax.models.multimodal import splice_image_tokens\n"
    )
    found = violations("data", "models", tmp_path / "pixellm_jax")
    assert found == [
        "pixellm_jax/data/bad.py: pixellm_jax.models",
        "pixellm_jax/data/bad.py: pixellm_jax.models.codebook",
        "pixellm_jax/data/bad.py: pixellm_jax.models.codebook.SegGather",
        "pixellm_jax/data/bad.py: pixellm_jax.models.llama",
        "pixellm_jax/data/bad.py: pixellm_jax.models.multimodal",
        "pixellm_jax/data/bad.py: pixellm_jax.models.multimodal.splice_image_tokens",
    ]
