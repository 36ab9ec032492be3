"""Exporters: a pixellm-jax checkpoint -> PyTorch layouts, through the same key tables as the importers.

* `export_pixellm`: the PixelLM release layout (`hf_model/`): `pytorch_model-0000k-of-0000n.bin`
  shards written by `torch.save` with a `pytorch_model.bin.index.json` (split in key order at
  `max_shard_size`, index keys sorted, as transformers 4.31 `save_pretrained` does), `config.json` in
  the official fields, `generation_config.json` and the tokenizer. Keys and dtypes are those of the
  official `PixelLMForCausalLM` state dict: LLM and projectors bf16, pixel modules fp32 (`dtype=
  "official"`), transformers-4.31 `rotary_emb.inv_freq` buffers regenerated, LoRA merged (the release
  has it merged), no CLIP weights. The SAM prompt-encoder parts PixelLM never uses are written from
  the checkpoint's kept extras when it has them (a converted release: bit for bit), else freshly
  initialised as PyTorch would (seeded), so the official class loads the result with `strict=True`.
* `export_llava_hf`: `LlavaForConditionalGeneration` safetensors in the hub layout (LLaMA, CLIP,
  `multi_modal_projector`); PixelLM's own modules are not part of it.
* `export_peft`: the LoRA factors as a peft adapter directory (`adapter_config.json` +
  `adapter_model.safetensors`) for `LlamaForCausalLM`-named modules, which the official model shares.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from pixellm_jax.config import Config
from pixellm_jax.convert.checkpoint import EXTRAS_FILE, Pretrained, load_pretrained, model_params, staged_output
from pixellm_jax.convert.errors import ConversionError
from pixellm_jax.convert.importers import PIXELLM_MODULES, TOKENIZER_FILES
from pixellm_jax.convert.readers import CheckpointReader, to_torch
from pixellm_jax.convert.tables import (
    PROMPT_ENCODER_KEEP,
    Table,
    Transform,
    llava_hf_table,
    peft_table,
    pixellm_release_table,
    transforms_for,
)
from pixellm_jax.models.lora import LoRAParam, merge_lora

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
DTYPE_POLICIES = ("official", "keep", *DTYPES)
# Keys the release stores in bf16; everything else (pixel modules, inv_freq) is fp32.
OFFICIAL_BF16 = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.", "model.mm_projector.",
                 "model.out_mm_projector.")
MASK_IN_CHANS = 16  # PixelLM's PromptEncoder(mask_in_chans=16)


@dataclass
class Entry:
    """One exported tensor: from a parameter (`path`, `layer` slice, inverse `transform`) or a fixed value."""

    key: str
    path: str | None = None
    layer: int | None = None
    transform: Transform | None = None
    value: np.ndarray | None = None

    def array(self, params: Mapping[str, np.ndarray]) -> np.ndarray:
        if self.value is not None:
            return self.value
        x = params[self.path]
        if self.layer is not None:
            x = x[self.layer]
        return np.ascontiguousarray(self.transform.inverse(np.asarray(x)))

    def shape_dtype(self, params: Mapping[str, np.ndarray]) -> tuple[tuple[int, ...], np.dtype]:
        if self.value is not None:
            return self.value.shape, self.value.dtype
        x = params[self.path]
        shape = x.shape[1:] if self.layer is not None else x.shape
        probe = self.transform.inverse(np.broadcast_to(np.bool_(False), shape))  # no memory
        return probe.shape, x.dtype


@dataclass
class Export:
    output: Path
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def parse_size(text: str | int) -> int:
    """Bytes of '10GB', '500MB', '20KB' (decimal units, as transformers) or an integer."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", str(text).upper())
    if not m:
        raise ConversionError(f"cannot read size {text!r} (e.g. 10GB, 500MB)")
    scale = {"": 1, "B": 1, "KB": 10**3, "K": 10**3, "MB": 10**6, "M": 10**6, "GB": 10**9, "G": 10**9,
             "TB": 10**12, "T": 10**12}[m.group(2)]
    return int(float(m.group(1)) * scale)


def export_entries(
    params: Mapping[str, np.ndarray],
    table: Table,
    transforms: Mapping[str, Transform],
    drop: Callable[[str], str | None],
) -> list[Entry]:
    """Every parameter as table keys, in table order (a stacked block of rules layer by layer).

    A parameter no rule exports must be dropped with a reason, else one ConversionError lists them.
    """
    entries: list[Entry] = []
    claimed: set[str] = set()
    block: list[tuple] = []

    def flush():
        if block:
            layers = params[block[0][1]].shape[0]
            for layer in range(layers):
                for rule, path in block:
                    entries.append(Entry(rule.source_key({}, layer), path, layer, transforms[rule.transform]))
            block.clear()

    for rule in table.rules:
        if rule.stack:
            path = rule.target
            if path in params and path not in claimed:
                block.append((rule, path))
                claimed.add(path)
            continue
        flush()
        hits = []
        for path in params:
            values = rule.match_target(path)
            if values is not None and path not in claimed:
                hits.append((tuple(values.values()), path, values))
        for _, path, values in sorted(hits):
            entries.append(Entry(rule.source_key(values), path, None, transforms[rule.transform]))
            claimed.add(path)
    flush()
    left = [p for p in params if p not in claimed and drop(p) is None]
    if left:
        raise ConversionError(f"the {table.name} layout has no place for: {', '.join(sorted(left))}")
    return entries


def _cast(x: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    return x if dtype is None or x.dtype == dtype else x.astype(dtype)


def _plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Consecutive keys, a new shard whenever the next tensor would overflow `max_bytes`."""
    shards: list[list[str]] = [[]]
    used = 0
    for key, n in sizes:
        if shards[-1] and used + n > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += n
    return shards


def write_shards(
    out: Path, entries: list[Entry], params: Mapping[str, np.ndarray], dtype_of: Callable[[Entry], np.dtype | None],
    *, fmt: str, max_bytes: int, progress: bool = False,
) -> list[str]:
    """Shards + index in transformers' naming (`fmt`: "bin" via torch.save, or "safetensors")."""
    import torch

    sizes, dtypes = [], {}
    for e in entries:
        shape, dtype = e.shape_dtype(params)
        dtypes[e.key] = dtype_of(e) or dtype
        sizes.append((e.key, int(np.prod(shape)) * dtypes[e.key].itemsize))
    by_key = {e.key: e for e in entries}
    shards = _plan_shards(sizes, max_bytes)
    stem, ext = ("pytorch_model", "bin") if fmt == "bin" else ("model", "safetensors")
    names = ([f"{stem}.{ext}"] if len(shards) == 1
             else [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}" for i in range(len(shards))])
    with tqdm(total=sum(n for _, n in sizes), unit="B", unit_scale=True, desc="exporting", disable=not progress,
              leave=False) as bar:
        for name, keys in zip(names, shards):
            tensors = {k: to_torch(_cast(by_key[k].array(params), dtypes[k])) for k in keys}
            if fmt == "bin":
                torch.save(tensors, out / name)
            else:
                from safetensors.torch import save_file

                save_file(tensors, str(out / name), metadata={"format": "pt"})
            bar.update(sum(t.numel() * t.element_size() for t in tensors.values()))
            del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(n for _, n in sizes)},
                 "weight_map": {k: name for name, keys in zip(names, shards) for k in keys}}
        (out / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


def _load(
    checkpoint: str | Path | Pretrained, merge: bool, notes: list[str], dtype: str = "keep"
) -> tuple[Pretrained, dict[str, np.ndarray]]:
    """The checkpoint's model (LoRA merged when asked, in the export's explicit `dtype` if it names
    one, else in each kernel's storage dtype as the official merge does) and its parameters as host
    arrays."""
    pre = checkpoint if isinstance(checkpoint, Pretrained) else load_pretrained(checkpoint)
    from flax import nnx

    has_lora = bool(nnx.to_flat_state(nnx.state(pre.model, LoRAParam)))
    if has_lora and merge:
        merge_lora(pre.model, DTYPES.get(dtype))
        notes.append("LoRA merged into the base weights (W + alpha/r * A B)")
    elif has_lora:
        notes.append("LoRA not merged: the export holds the base weights only (export the adapter with --to peft)")
    return pre, {p: np.asarray(v) for p, v in model_params(pre.model).items()}


def _copy_tokenizer(pre: Pretrained, out: Path) -> None:
    for name in TOKENIZER_FILES:
        if (pre.tokenizer_dir / name).is_file():
            shutil.copy2(pre.tokenizer_dir / name, out / name)


def _extras(checkpoint_dir: Path | None) -> dict[str, np.ndarray]:
    path = None if checkpoint_dir is None else checkpoint_dir / EXTRAS_FILE
    if path is None or not path.is_file():
        return {}
    reader = CheckpointReader(path)
    return {k: reader.read(k) for k in reader.keys()}


def official_prompt_encoder_extras(dim: int, seed: int) -> dict[str, np.ndarray]:
    """The SAM prompt-encoder parts PixelLM never uses, initialised as PyTorch initialises them."""
    import torch
    from torch import nn

    from pixellm_jax.convert.readers import to_numpy

    torch.manual_seed(seed)
    c = MASK_IN_CHANS
    out = {f"point_embeddings.{i}.weight": nn.Embedding(1, dim).weight for i in range(4)}
    out["not_a_point_embed.weight"] = nn.Embedding(1, dim).weight
    for i, (cin, cout, k) in ((0, (1, c // 4, 2)), (3, (c // 4, c, 2)), (6, (c, dim, 1))):
        conv = nn.Conv2d(cin, cout, k, k)
        out[f"mask_downscaling.{i}.weight"], out[f"mask_downscaling.{i}.bias"] = conv.weight, conv.bias
    for i, n in ((1, c // 4), (4, c)):  # LayerNorm2d: weight 1, bias 0
        out[f"mask_downscaling.{i}.weight"], out[f"mask_downscaling.{i}.bias"] = torch.ones(n), torch.zeros(n)
    order = [f"point_embeddings.{i}.weight" for i in range(4)] + ["not_a_point_embed.weight"] + [
        f"mask_downscaling.{i}.{w}" for i in (0, 1, 3, 4, 6) for w in ("weight", "bias")]
    return {f"model.prompt_encoder.{k}": to_numpy(out[k].detach().float()) for k in order}


def _inv_freq(cfg: Config) -> np.ndarray:
    """transformers 4.31 `LlamaRotaryEmbedding.inv_freq`, computed by torch exactly as it did."""
    import torch

    from pixellm_jax.convert.readers import to_numpy

    d, base = cfg.model.text.head_dim, cfg.model.text.rope_theta
    return to_numpy(1.0 / (base ** (torch.arange(0, d, 2).float() / d)))


def release_config(cfg: Config, source_config: dict | None) -> dict:
    """`config.json` with the official PixelLM fields (the source release's own fields kept)."""
    m = cfg.model
    t, v, h, p = m.text, m.vision, m.head, m.projector
    out = dict(source_config or {})
    out.update({
        "architectures": ["PixelLMForCausalLM"], "model_type": "llava", "hidden_act": "silu",
        "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads, "rms_norm_eps": t.rms_norm_eps,
        "max_position_embeddings": t.max_position_embeddings, "vocab_size": t.vocab_size,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": False,
        "mm_hidden_size": v.hidden_size, "mm_projector_hidden_dim": p.hidden_mult, "mm_projector_out_dim": 1,
        "mm_use_im_start_end": cfg.data.use_im_start_end, "mm_vision_select_layer": v.feature_layers[0],
        "mm_vision_select_feature": "patch", "image_feature_scale_num": h.scale_num, "out_dim": h.out_dim,
        "resize_vision_tower": v.image_size != v.pretrained_image_size, "resize_vision_tower_size": v.image_size,
        "separate_mm_projector": p.separate_out_projector,
    })
    out.setdefault("mm_vision_tower", "openai/clip-vit-large-patch14-336")
    out.setdefault("transformers_version", "4.31.0")
    if t.rope_theta != 10000.0:
        out["rope_theta"] = t.rope_theta
    for k, val in (("bos_token_id", 1), ("eos_token_id", 2), ("pad_token_id", 0)):
        out.setdefault(k, val)
    return out


def export_pixellm(
    checkpoint: str | Path | Pretrained,
    out: str | Path,
    *,
    merge: bool = True,
    dtype: str = "official",
    max_shard_size: str | int = "10GB",
    inv_freq: bool = True,
    force: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> Export:
    """Write the PixelLM release layout (see the module docstring)."""
    if dtype not in DTYPE_POLICIES:
        raise ConversionError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_POLICIES)}")
    notes: list[str] = []
    pre, params = _load(checkpoint, merge, notes, dtype)
    cfg = pre.config

    def drop(path: str) -> str | None:
        if path.startswith("vision_tower/"):
            return "the release carries no CLIP weights"
        if path.endswith(("/lora_a", "/lora_b")):
            return "LoRA factor"
        return None

    entries = export_entries(params, pixellm_release_table(), transforms_for(cfg.model.vision), drop)
    if inv_freq:
        table = _inv_freq(cfg)
        with_freq = []
        for e in entries:
            with_freq.append(e)
            m = re.fullmatch(r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", e.key)
            if m:
                with_freq.append(Entry(f"model.layers.{m.group(1)}.self_attn.rotary_emb.inv_freq", value=table))
        entries = with_freq
    directory = None if isinstance(checkpoint, Pretrained) else Path(checkpoint)
    extras = {k: v for k, v in _extras(directory).items() if any(s.matches(k) for s in PROMPT_ENCODER_KEEP)}
    if not extras:
        extras = official_prompt_encoder_extras(cfg.model.head.out_dim, seed)
        notes.append("unused SAM prompt-encoder parts (point embeddings, mask_downscaling) freshly initialised "
                     f"with seed {seed}: the checkpoint did not keep them")
    at = next(i for i, e in enumerate(entries) if e.key == "model.prompt_encoder.no_mask_embed.weight")
    entries[at:at] = [Entry(k, value=v) for k, v in extras.items()]

    def dtype_of(e: Entry) -> np.dtype | None:
        if e.value is not None or dtype == "keep":
            return None
        if dtype == "official":
            return DTYPES["bfloat16" if e.key.startswith(OFFICIAL_BF16) else "float32"]
        return DTYPES[dtype]

    source = pre.report.get("source") or {}
    source_config = source.get("source_config") if source.get("kind") == "pixellm" else None
    with staged_output(out, force) as stage:
        files = write_shards(stage, entries, params, dtype_of, fmt="bin", max_bytes=parse_size(max_shard_size),
                             progress=progress)
        config = release_config(cfg, source_config)
        (stage / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (stage / "generation_config.json").write_text(json.dumps(
            {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
             "transformers_version": "4.31.0"}, indent=2, sort_keys=True) + "\n")
        _copy_tokenizer(pre, stage)
    return Export(Path(out), files, notes)


def _llava_hf_config(cfg: Config, vocab: int, image_token: int) -> dict:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    t, v, p = cfg.model.text, cfg.model.vision, cfg.model.projector
    text = LlamaConfig(vocab_size=vocab, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                       num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                       num_key_value_heads=t.num_kv_heads, rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta,
                       max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                              num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                              image_size=v.image_size, patch_size=v.patch_size, hidden_act="quick_gelu",
                              layer_norm_eps=v.layer_norm_eps)
    return LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=image_token,
                       projector_hidden_act="gelu", vision_feature_layer=v.feature_layers[0],
                       vision_feature_select_strategy="default", image_seq_length=v.grid**2,
                       tie_word_embeddings=False).to_dict()


def export_llava_hf(
    checkpoint: str | Path | Pretrained,
    out: str | Path,
    *,
    merge: bool = True,
    dtype: str = "keep",
    max_shard_size: str | int = "5GB",
    force: bool = False,
    progress: bool = False,
) -> Export:
    """Write `LlavaForConditionalGeneration` safetensors (hub layout), config and tokenizer."""
    if dtype not in DTYPE_POLICIES or dtype == "official":
        raise ConversionError(f"dtype {dtype!r}: use keep, float32, bfloat16 or float16 for llava-hf")
    notes: list[str] = []
    pre, params = _load(checkpoint, merge, notes, dtype)
    cfg = pre.config
    v, p = cfg.model.vision, cfg.model.projector
    if p.hidden_mult != 1:
        raise ConversionError(
            f"model.projector.hidden_mult={p.hidden_mult}: llava-hf's projector is Linear(vision, H) -> GELU -> "
            f"Linear(H, H); this model's mm_projector is {p.hidden_mult}H wide and has no llava-hf form"
        )
    if p.llm_grid != v.grid:
        notes.append(f"llava-hf feeds all {v.grid}x{v.grid} patches to the LLM; this model pools them to "
                     f"{p.llm_grid}x{p.llm_grid}: the export loads but computes a different function")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(pre.tokenizer_dir))
    if "<image>" not in tok.get_vocab():
        from transformers import AddedToken

        tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
        notes.append("added the <image> token the llava-hf processor expands")
    image_token = tok.convert_tokens_to_ids("<image>")
    vocab = params["llm/embed_tokens/embedding"].shape[0]
    if image_token >= vocab:  # a row for it (image positions are overwritten by image features anyway)
        grow = image_token + 1 - vocab
        emb, head = params["llm/embed_tokens/embedding"], params["llm/lm_head/kernel"]
        params["llm/embed_tokens/embedding"] = np.concatenate([emb, np.zeros((grow, emb.shape[1]), emb.dtype)])
        params["llm/lm_head/kernel"] = np.concatenate([head, np.zeros((head.shape[0], grow), head.dtype)], axis=1)
        vocab = image_token + 1

    def drop(path: str) -> str | None:
        root = path.split("/")[0]
        if root in PIXELLM_MODULES or path == "mask_decoder/scale_logits":
            return "PixelLM module, not part of llava-hf"
        if path.endswith(("/lora_a", "/lora_b")):
            return "LoRA factor"
        return None

    entries = export_entries(params, llava_hf_table(), transforms_for(v), drop)
    kept = {k: val for k, val in _extras(None if isinstance(checkpoint, Pretrained) else Path(checkpoint)).items()
            if re.fullmatch(r"(.*\.)?post_layernorm\.(weight|bias)", k)}
    for name, default in (("weight", np.ones), ("bias", np.zeros)):
        value = next((val for k, val in kept.items() if k.endswith(f"post_layernorm.{name}")), None)
        if value is None:
            value = default(v.hidden_size, np.float32)
            notes.append(f"vision post_layernorm.{name} not kept by the checkpoint: written as identity (unused)")
        entries.append(Entry(f"vision_tower.vision_model.post_layernorm.{name}", value=value))
    cast = None if dtype == "keep" else DTYPES[dtype]
    with staged_output(out, force) as stage:
        files = write_shards(stage, entries, params, lambda e: cast, fmt="safetensors",
                             max_bytes=parse_size(max_shard_size), progress=progress)
        (stage / "config.json").write_text(json.dumps(_llava_hf_config(cfg, vocab, image_token), indent=2,
                                                      sort_keys=True, default=str) + "\n")
        tok.save_pretrained(str(stage))
        if (pre.tokenizer_dir / "tokenizer.model").is_file():
            shutil.copy2(pre.tokenizer_dir / "tokenizer.model", stage / "tokenizer.model")
    return Export(Path(out), files, notes)


EXCLUDED_FROM_LORA = ("visual_model", "vision_tower", "mm_projector", "text_hidden_fcs", "mask_decoder",
                      "image_feature_neck", "prompt_encoder")


def peft_target_regex(targets: Iterable[str]) -> str:
    """peft `target_modules` regex selecting exactly the official LoRA modules (LLaMA layers only)."""
    excluded = "|".join(EXCLUDED_FROM_LORA)
    return rf"^(?!.*({excluded})).*\.({'|'.join(targets)})$"


def export_peft(
    checkpoint: str | Path | Pretrained,
    out: str | Path,
    *,
    base_model: str | None = None,
    force: bool = False,
) -> Export:
    """Write the LoRA factors as a peft adapter (`adapter_config.json` + `adapter_model.safetensors`)."""
    pre = checkpoint if isinstance(checkpoint, Pretrained) else load_pretrained(checkpoint)
    lora = pre.config.model.lora
    params = {p: np.asarray(v, np.float32) for p, v in model_params(pre.model).items()
              if p.endswith(("/lora_a", "/lora_b"))}
    if not lora.enabled or not params:
        raise ConversionError(f"{checkpoint}: the model has no LoRA adapter (model.lora.enabled is false)")
    entries = export_entries(params, peft_table(lora.targets), transforms_for(pre.config.model.vision),
                             lambda path: None)
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout, "bias": "none", "target_modules": peft_target_regex(lora.targets),
        "base_model_name_or_path": base_model, "inference_mode": True, "fan_in_fan_out": False,
        "init_lora_weights": True, "modules_to_save": None, "use_rslora": False, "use_dora": False,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    with staged_output(out, force) as stage:
        from safetensors.torch import save_file

        save_file({e.key: to_torch(e.array(params)) for e in entries}, str(stage / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        (stage / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    return Export(Path(out), ["adapter_model.safetensors"], [])
