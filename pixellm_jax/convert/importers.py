"""Importers: what each PyTorch source is, which tables read it, and the model config it implies.

Three kinds of source (`prepare_import(kind, ...)`):

* `pixellm`: a released PixelLM `hf_model/` (sharded `.bin` + index, LoRA merged, no CLIP weights)
  plus the OpenAI CLIP checkpoint (`--clip`), whose position table is interpolated to the model's
  image size the official way. Everything must load; only LoRA factors (fresh, B = 0: the same
  function) and paper-mode parameters are initialised.
* `llava-hf`: `LlavaForConditionalGeneration` files, either vision prefix. The LLaMA and CLIP weights
  load; the projector loads when the model's projector has its shape (set
  `model.projector.hidden_mult=1`), otherwise it is skipped and initialised; PixelLM's own modules are
  initialised.
* `llava`: original haotian-liu LLaVA (v1 linear or v1.5 `mlp2x_gelu` projector) plus `--clip`, as
  the base of PixelLM training: LLaMA and CLIP load, PixelLM's modules are initialised. The official
  PixelLM code builds a new `mm_projector` (Linear 1024->2H->H) whose weights are not taken from
  LLaVA (different names and shapes); here a source projector of exactly the model's shape is loaded
  and any other is skipped whole and initialised, and the report says which happened.

For the LLaVA kinds the tokenizer gains the codebook tokens (`[SEG0..]`, then `<im_start>`/`<im_end>`
when `data.use_im_start_end`) as the official training script adds them, and the vocabulary grows to
match: the source rows load, the new rows are initialised (N(0, 0.02), as transformers 4.31 resized).

Each of the source, `--clip` and `--tokenizer` is a local path or a Hugging Face hub id
(`owner/name[@revision]`), fetched into the hub cache by `hub.local_or_hub`; a local path wins.

The model config starts from a base YAML (`--config`, default `pixellm_7b`); the source's
`config.json` (read as plain JSON, never via AutoConfig) sets the LLaMA and CLIP architecture, the
vocabulary size comes from the tensors, the codebook ids and N·L from the added-token table, and the
user's `section.field=value` overrides are applied last.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from pixellm_jax.config import Config, ConfigError, apply_override, from_dict, load_config, to_dict
from pixellm_jax.convert.errors import ConversionError
from pixellm_jax.convert.hub import local_or_hub
from pixellm_jax.convert.readers import CheckpointReader
from pixellm_jax.convert.tables import Table, clip_table, llava_hf_table, llava_table, pixellm_release_table
from pixellm_jax.convert.validate import Source

KINDS = ("pixellm", "llava-hf", "llava")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
IM_START, IM_END = "<im_start>", "<im_end>"
PathArg = str | Path | None
PIXELLM_MODULES = ("out_mm_projector", "text_hidden_fcs", "image_feature_neck", "prompt_encoder",
                   "mask_decoder", "token_fusion")


@dataclass
class ImportSpec:
    """Everything a conversion needs: config, sources with their tables, and the initialisation policy."""

    kind: str
    config: Config
    sources: list[Source]
    initialise: Callable[[str], str | None]
    write_tokenizer: Callable[[Path], None]
    skippable_groups: tuple[str, ...] = ()
    allow_grow: bool = False
    info: dict = field(default_factory=dict)  # source description for the report (exporters read it)
    notes: list[str] = field(default_factory=list)


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConversionError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return data


def model_directory(source: str | Path) -> Path:
    """The directory holding the weights: `source`, or its `hf_model/` (the PixelLM hub layout)."""
    source = Path(source)
    if not source.exists():
        raise ConversionError(f"{source}: no such checkpoint file or directory")
    if source.is_dir() and not (source / "config.json").exists() and (source / "hf_model" / "config.json").exists():
        return source / "hf_model"
    return source


def detect_kind(source: str | Path) -> str:
    """`pixellm`, `llava-hf` or `llava` from the source's `config.json`."""
    directory = model_directory(source)
    cfg = read_json((directory if directory.is_dir() else directory.parent) / "config.json")
    if "text_config" in cfg and "vision_config" in cfg:
        return "llava-hf"
    if "PixelLMForCausalLM" in (cfg.get("architectures") or []) or "out_dim" in cfg:
        return "pixellm"
    if cfg.get("model_type") in ("llava", "llava_llama") or any(k.startswith("mm_") for k in cfg):
        return "llava"
    raise ConversionError(f"{directory}/config.json: cannot tell the checkpoint kind; pass --from {'|'.join(KINDS)}")


# ---------------------------------------------------------------------------------------------
# Reading architecture from config.json files


def _text_section(llama: dict, where: Path) -> dict:
    """LLaMA architecture of a `LlamaConfig`-shaped dict (transformers' defaults fill what is absent)."""
    from transformers import LlamaConfig

    try:
        c = LlamaConfig(**{k: v for k, v in llama.items() if k not in ("architectures", "model_type")})
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}: not a LLaMA config ({e})") from None
    rope = getattr(c, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    heads = c.num_attention_heads
    return dict(
        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_layers=c.num_hidden_layers,
        num_heads=heads, num_kv_heads=c.num_key_value_heads or heads, rms_norm_eps=float(c.rms_norm_eps),
        rope_theta=float(theta or llama.get("rope_theta") or 10000.0),
        max_position_embeddings=c.max_position_embeddings,
    )


def _vision_section(clip: dict, where: Path) -> dict:
    """CLIP vision architecture of a `CLIPConfig` (its `vision_config`) or `CLIPVisionConfig` dict."""
    from transformers import CLIPVisionConfig

    vision = clip.get("vision_config") or clip
    try:
        c = CLIPVisionConfig(**{k: v for k, v in vision.items() if k not in ("architectures", "model_type")})
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}: not a CLIP config ({e})") from None
    if c.hidden_act != "quick_gelu":
        raise ConversionError(f"{where}: vision hidden_act {c.hidden_act!r}; the CLIP tower here uses quick_gelu")
    return dict(
        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads, patch_size=c.patch_size, pretrained_image_size=c.image_size,
        layer_norm_eps=float(c.layer_norm_eps),
    )


def read_added_tokens(directory: Path) -> dict[str, int]:
    """Added-token table from `added_tokens.json`, `tokenizer_config.json` or `tokenizer.json`."""
    if (directory / "added_tokens.json").is_file():
        return {k: int(v) for k, v in read_json(directory / "added_tokens.json").items()}
    if (directory / "tokenizer_config.json").is_file():
        decoder = read_json(directory / "tokenizer_config.json").get("added_tokens_decoder") or {}
        if decoder:
            return {v["content"]: int(k) for k, v in decoder.items()}
    if (directory / "tokenizer.json").is_file():
        return {t["content"]: int(t["id"]) for t in read_json(directory / "tokenizer.json").get("added_tokens", [])}
    return {}


def codebook_from_added(added: dict[str, int], where: Path) -> list[int]:
    """Ids of `[SEG0]..[SEG{k-1}]` (or the single `[SEG]`) in order; empty when there are none."""
    numbered = {int(m.group(1)): i for t, i in added.items() if (m := re.fullmatch(r"\[SEG(\d+)\]", t))}
    if numbered:
        if sorted(numbered) != list(range(len(numbered))):
            raise ConversionError(
                f"{where}: codebook tokens are not [SEG0]..[SEG{len(numbered) - 1}]: {sorted(numbered)}")
        return [numbered[i] for i in range(len(numbered))]
    return [added["[SEG]"]] if "[SEG]" in added else []


def _tensor_rows(reader: CheckpointReader, table: Table, target: str) -> int | None:
    """Leading dimension of the first source tensor the table maps to `target`."""
    for key, info in reader.infos.items():
        hit = table.rule_for_key(key)
        if hit is not None and hit[1] == target:
            return info.shape[0]
    return None


def _compose(base: str, sections: dict, overrides: Sequence[str]) -> dict:
    """Base YAML values, updated by the inferred sections, then by the user's overrides (raw dict)."""
    try:
        data = to_dict(load_config(base))
    except ConfigError as e:
        raise ConversionError(f"--config {base}: {e}") from None
    for path, value in sections.items():
        node = data
        *parents, leaf = path.split(".")
        for part in parents:
            node = node[part]
        if isinstance(value, dict):
            node[leaf].update(value)
        else:
            node[leaf] = value
    return _compose_overrides(data, overrides)


def _compose_overrides(data: dict, overrides: Sequence[str]) -> dict:
    try:
        for o in overrides:
            data = apply_override(data, o)
    except ConfigError as e:
        raise ConversionError(f"override: {e}") from None
    return data


def _build_config(data: dict, where: str) -> Config:
    try:
        return from_dict(data)
    except ConfigError as e:
        raise ConversionError(f"the config inferred from {where} is invalid: {e}") from None


def _copy_tokenizer(source: Path) -> Callable[[Path], None]:
    files = [source / n for n in TOKENIZER_FILES if (source / n).is_file()]
    if not files:
        raise ConversionError(f"{source}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); pass --tokenizer DIR")

    def write(directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, directory / f.name)

    return write


def _is_lora(path: str) -> bool:
    return path.endswith("/lora_a") or path.endswith("/lora_b")


# ---------------------------------------------------------------------------------------------
# The three kinds


def _clip_source(clip: PathArg, kind: str) -> tuple[Source, dict]:
    if clip is None:
        raise ConversionError(
            f"a {kind} checkpoint carries no CLIP weights; pass --clip DIR with the OpenAI CLIP checkpoint, "
            "or its hub id openai/clip-vit-large-patch14-336"
        )
    clip = Path(clip)
    directory = clip if clip.is_dir() else clip.parent
    vision = _vision_section(read_json(directory / "config.json"), directory)
    return Source(CheckpointReader(clip), clip_table()), vision


def _import_pixellm(source: Path, clip: PathArg, tokenizer: PathArg, base: str, overrides: list[str]) -> ImportSpec:
    cfg_json = read_json(source / "config.json")
    reader = CheckpointReader(source)
    table = pixellm_release_table()
    clip_src, vision = _clip_source(clip, "PixelLM")
    tok_dir = Path(tokenizer) if tokenizer else source
    seg_ids = codebook_from_added(read_added_tokens(tok_dir), tok_dir)
    if not seg_ids:
        raise ConversionError(f"{tok_dir}: the added-token table has no [SEG*] codebook tokens")
    vocab = _tensor_rows(reader, table, "llm/embed_tokens/embedding")
    if vocab is None:
        raise ConversionError(f"{source}: no model.embed_tokens.weight")
    text = _text_section(cfg_json, source / "config.json")
    text["vocab_size"] = vocab
    levels = int(cfg_json.get("image_feature_scale_num", 2)) if len(seg_ids) > 1 else 1
    if len(seg_ids) % levels:
        raise ConversionError(f"{tok_dir}: {len(seg_ids)} codebook tokens do not split into "
                              f"image_feature_scale_num={levels} levels")
    if cfg_json.get("resize_vision_tower") and cfg_json.get("resize_vision_tower_size"):
        vision["image_size"] = int(cfg_json["resize_vision_tower_size"])
    head = {"seg_token_ids": seg_ids, "seg_token_num": len(seg_ids) // levels, "scale_num": levels}
    if "out_dim" in cfg_json:
        head["out_dim"] = int(cfg_json["out_dim"])
    projector = {"hidden_mult": int(cfg_json.get("mm_projector_hidden_dim", 2)),
                 "separate_out_projector": bool(cfg_json.get("separate_mm_projector", True))}
    data = _compose(base, {"model.text": text, "model.vision": vision, "model.head": head,
                           "model.projector": projector,
                           "data.use_im_start_end": bool(cfg_json.get("mm_use_im_start_end", True))}, overrides)
    config = _build_config(data, str(source / "config.json"))

    def initialise(path: str) -> str | None:
        if _is_lora(path):
            return "LoRA factor: the release has LoRA merged; fresh adapter with B = 0 (same function)"
        if path.startswith("token_fusion/") or path == "mask_decoder/scale_logits":
            return "paper-mode parameter (absent from the official code); starts at the official fusion"
        return None

    return ImportSpec(
        "pixellm", config, [Source(reader, table), clip_src], initialise, _copy_tokenizer(tok_dir),
        info={"kind": "pixellm", "source": str(source), "clip": str(clip), "source_config": cfg_json},
    )


def _extend_tokenizer(
    directory: Path, config: Config, rows: int
) -> tuple[Callable[[Path], None], int, list[int], list[str]]:
    """Add the codebook (and image start/end) tokens as the official training does.

    Returns (tokenizer writer, vocabulary size, codebook ids, notes).
    """
    from transformers import AutoTokenizer

    from pixellm_jax.tokens import add_codebook_tokens

    _copy_tokenizer(directory)  # fails clearly when there is no tokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(directory))
    except Exception as e:
        raise ConversionError(f"{directory}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
    before = len(tok)
    h = config.model.head
    seg_ids = add_codebook_tokens(tok, h.seg_token_num, h.scale_num)
    if config.data.use_im_start_end:
        vocab = tok.get_vocab()
        tok.add_tokens([t for t in (IM_START, IM_END) if t not in vocab], special_tokens=True)
    vocab_size = max(rows, len(tok))
    notes = [f"tokenizer: {before} -> {len(tok)} tokens (codebook ids {seg_ids}); "
             f"checkpoint rows {rows} -> vocabulary {vocab_size}"]
    if any(i < rows for i in seg_ids):
        notes.append(f"codebook ids below {rows} reuse rows the checkpoint already has (e.g. llava-hf padding rows)")
    sp_model = directory / "tokenizer.model"

    def write(out: Path) -> None:
        tok.save_pretrained(str(out))
        if sp_model.is_file():  # keep the SentencePiece model: data/conversation.py encodes pieces with it
            shutil.copy2(sp_model, out / "tokenizer.model")

    return write, vocab_size, seg_ids, notes


def _llava_initialise(path: str) -> str | None:
    if _is_lora(path):
        return "LoRA factor: fresh adapter with B = 0"
    if path.split("/")[0] in PIXELLM_MODULES or path == "mask_decoder/scale_logits":
        return "PixelLM module, not part of LLaVA: initialised"
    if path.startswith("mm_projector/"):
        return "no projector weights of this shape in the source (LLaVA v1 single Linear?): initialised"
    return None


def _finish_llava(
    kind: str, data: dict, sources: list[Source], tok_dir: Path, info: dict, notes: list[str]
) -> ImportSpec:
    """Extend the tokenizer (and the vocabulary) for the codebook; the spec of a LLaVA-kind import."""
    config = _build_config(data, info["source"])
    rows = _tensor_rows(sources[0].reader, sources[0].table, "llm/embed_tokens/embedding")
    if rows is None:
        raise ConversionError(f"{info['source']}: no embed_tokens weight found")
    write, vocab, seg_ids, tok_notes = _extend_tokenizer(tok_dir, config, rows)
    data["model"]["text"]["vocab_size"] = vocab
    data["model"]["head"]["seg_token_ids"] = seg_ids
    config = _build_config(data, info["source"])
    return ImportSpec(kind, config, sources, _llava_initialise, write, skippable_groups=("mm_projector",),
                      allow_grow=True, info=info, notes=notes + tok_notes)


def _import_llava_hf(source: Path, clip: PathArg, tokenizer: PathArg, base: str, overrides: list[str]) -> ImportSpec:
    cfg_json = read_json(source / "config.json")
    text = _text_section(cfg_json["text_config"], source / "config.json")
    vision = _vision_section({"vision_config": cfg_json["vision_config"]}, source / "config.json")
    layer = cfg_json.get("vision_feature_layer", -2)
    if isinstance(layer, list):
        if len(layer) != 1:
            raise ConversionError(f"{source}/config.json: vision_feature_layer {layer}: only one layer is supported")
        layer = layer[0]
    if cfg_json.get("vision_feature_select_strategy", "default") != "default":
        raise ConversionError(f"{source}/config.json: vision_feature_select_strategy must be 'default' (CLS dropped)")
    notes = []
    if cfg_json.get("projector_hidden_act", "gelu") != "gelu":
        notes.append(f"projector_hidden_act {cfg_json['projector_hidden_act']!r} differs from the exact GELU used here")
    data = _compose(base, {"model.text": text, "model.vision": vision}, ())
    data["model"]["vision"]["feature_layers"][0] = int(layer)
    data = _compose_overrides(data, overrides)
    reader = CheckpointReader(source)
    table = llava_hf_table()
    info = {"kind": "llava-hf", "source": str(source), "source_config": cfg_json,
            "image_token_index": cfg_json.get("image_token_index", cfg_json.get("image_token_id"))}
    return _finish_llava("llava-hf", data, [Source(reader, table)], Path(tokenizer) if tokenizer else source,
                         info, notes)


def _import_llava(source: Path, clip: PathArg, tokenizer: PathArg, base: str, overrides: list[str]) -> ImportSpec:
    cfg_json = read_json(source / "config.json")
    text = _text_section(cfg_json, source / "config.json")
    reader = CheckpointReader(source)
    table = llava_table()
    sources = [Source(reader, table)]
    sections = {"model.text": text}
    has_clip = any(k.startswith("model.vision_tower.") for k in reader.infos)
    if clip is not None or not has_clip:
        clip_src, vision = _clip_source(clip, "LLaVA")
        sources.append(clip_src)
        sections["model.vision"] = vision
    data = _compose(base, sections, ())
    data["model"]["vision"]["feature_layers"][0] = int(cfg_json.get("mm_vision_select_layer", -2))
    data = _compose_overrides(data, overrides)
    notes = [] if "model.vision" in sections else [
        "the CLIP tower comes from the checkpoint itself; its architecture is the base config's model.vision"]
    if any(k.startswith("model.mm_projector.") and k.count(".") == 2 for k in reader.infos):
        notes.append("LLaVA v1 linear projector in the source: skipped, mm_projector initialised")
    info = {"kind": "llava", "source": str(source), "clip": str(clip) if clip else None, "source_config": cfg_json}
    return _finish_llava("llava", data, sources, Path(tokenizer) if tokenizer else source, info, notes)


def prepare_import(
    kind: str,
    source: str | Path,
    *,
    clip: str | Path | None = None,
    tokenizer: str | Path | None = None,
    base: str = "pixellm_7b",
    overrides: Sequence[str] = (),
) -> ImportSpec:
    """Open the source checkpoint(s) and work out the config and the tables (`kind`: KINDS or "auto").

    `source`, `clip` and `tokenizer` are local paths or hub ids (`owner/name[@revision]`, `hub.py`).
    """
    importers = {"pixellm": _import_pixellm, "llava-hf": _import_llava_hf, "llava": _import_llava}
    if kind != "auto" and kind not in importers:
        raise ConversionError(f"unknown source kind {kind!r}; one of {', '.join(KINDS)}")
    source, source_note = local_or_hub(source)
    clip, clip_note = local_or_hub(clip)
    tokenizer, tokenizer_note = local_or_hub(tokenizer, weights=False)
    source = model_directory(source)
    if kind == "auto":
        kind = detect_kind(source)
    spec = importers[kind](source, clip, tokenizer, base, list(overrides))
    spec.notes[:0] = [n for n in (source_note, clip_note, tokenizer_note) if n]
    return spec
