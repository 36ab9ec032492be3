"""Evaluation splits named on the command line by a dataset spec (`pixellm_jax/data/specs.py`).

`pixellm eval --split [NAME=]KIND[:key=value,...]` takes the spec a training config's `data.val`
takes; a kind given without paths reads the official `./dataset` layout under `--dataset-dir`, in
evaluation mode (REFER `split=val`, `mode=val`; `muse_val.json`). Referring splits default to the
official teacher-forced protocol, MUSE and synthetic splits to generation.
Examples: `refcocog_val=refer:root=data/refer_seg,dataset=refcocog,split=val`,
`muse:json=data/muse_val.json,images=data/coco`.
"""

from __future__ import annotations

from pathlib import Path

from pixellm_jax.data.specs import SpecContext, SpecError, default_name, open_spec, parse_spec, protocol_of
from pixellm_jax.eval.evaluate import Split


def parse_split(spec: str, dataset_dir: str | Path = "dataset") -> Split:
    """A `Split` from its spec; errors name the spec and the key. A group kind (`refer_seg`,
    `sem_seg`) is refused: an evaluation split is one dataset."""
    parsed = parse_spec(spec)
    ctx = SpecContext(dataset_dir=Path(dataset_dir), purpose="eval")
    sources = open_spec(parsed, ctx)
    if len(sources) != 1:
        raise SpecError(f"split {spec!r}: kind {parsed.kind!r} names {len(sources)} datasets; "
                        "evaluate each on its own split")
    source = sources[0]
    return Split(default_name(parsed, source, ctx), source, protocol_of(parsed, source))
