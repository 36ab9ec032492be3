"""Dataset splits named on the command line: `[NAME=]KIND:key=value,key=value,...`.

Kinds and their keys (values are parsed as YAML scalars):
  refer      root, dataset (refcoco|refcoco+|refcocog|refclef), split (val|testA|...), split_by,
             mode (val = single referring, default | val_multi = multi-referring), image_dir
  muse       json, images (the COCO image root with train2014/, train2017/, val2017/)
  synthetic  any `SyntheticShapes` argument (num_samples, seed, questions_per_image, ...)
  tfds       name (e.g. pixellm_records/refcoco), split, data_dir: a dataset written by
             `pixellm prepare-data` (or the TFDS catalog's ref_coco), plus its kind's options
             (referring kinds default to mode=val)
Every kind also takes `protocol` (teacher_forced | generate): referring splits default to the
official teacher-forced protocol, MUSE and synthetic splits to generation.
Examples: `refcocog_val=refer:root=data/refer_seg,dataset=refcocog,split=val`,
`muse:json=data/muse_val.json,images=data/coco`.
"""

from __future__ import annotations

import yaml

from pixellm_jax.data.muse import MuseSource
from pixellm_jax.data.refer import ReferSource
from pixellm_jax.data.synthetic import SyntheticShapes
from pixellm_jax.eval.batches import PROTOCOLS
from pixellm_jax.eval.evaluate import Split

KINDS = ("refer", "muse", "synthetic", "tfds")
_REFERRING_RECORDS = ("refer", "ref_coco")  # TfdsSource kinds evaluated like `refer`


def _options(text: str, spec: str) -> dict:
    options = {}
    for part in filter(None, text.split(",")):
        if "=" not in part:
            raise ValueError(f"split {spec!r}: expected key=value, got {part!r}")
        key, value = part.split("=", 1)
        parsed = yaml.safe_load(value) if value else ""
        options[key.strip()] = value if isinstance(parsed, (dict, list)) or parsed is None else parsed
    return options


def parse_split(spec: str) -> Split:
    """A `Split` from its command-line spec (see module doc); errors name the spec and the key."""
    head, _, opts = spec.partition(":")
    name, _, kind = head.rpartition("=")
    if kind not in KINDS:
        raise ValueError(f"split {spec!r}: unknown kind {kind!r} (known: {', '.join(KINDS)})")
    options = _options(opts, spec)
    protocol = options.pop("protocol", None)

    def need(*keys: str) -> None:
        missing = [k for k in keys if k not in options]
        if missing:
            raise ValueError(f"split {spec!r}: kind {kind!r} needs {', '.join(missing)}")

    try:
        if kind == "refer":
            need("root")
            options.setdefault("mode", "val")
            options["refer_root"] = options.pop("root")
            source = ReferSource(**{k: (str(v) if k != "mode" else v) for k, v in options.items()})
            default = f"{source.name}_{options.get('split', 'train')}" + ("_multi" if options["mode"] == "val_multi" else "")
        elif kind == "tfds":
            need("name", "split", "data_dir")
            source, default = _tfds_source(options)
            kind = "refer" if source.kind in _REFERRING_RECORDS else source.kind
        elif kind == "muse":
            need("json", "images")
            source = MuseSource(str(options.pop("json")), str(options.pop("images")), **options)
            default = "muse"
        else:
            source = SyntheticShapes(**options)
            default = "synthetic"
    except TypeError as e:  # an unknown key
        raise ValueError(f"split {spec!r}: {e}") from None
    protocol = str(protocol or ("teacher_forced" if kind == "refer" else "generate"))
    if protocol not in PROTOCOLS:
        raise ValueError(f"split {spec!r}: protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return Split(name or default, source, protocol)


def _tfds_source(options: dict):
    """A prepared dataset; referring kinds are opened in evaluation mode unless a mode is given."""
    from pixellm_jax.data.tfds_source import TfdsSource

    name, split, data_dir = str(options.pop("name")), str(options.pop("split")), str(options.pop("data_dir"))
    source = TfdsSource(name, split, data_dir, **options)
    if source.kind in _REFERRING_RECORDS and "mode" not in options:
        source = TfdsSource(name, split, data_dir, mode="val", **options)
    return source, f"{source.name}_{split}"
