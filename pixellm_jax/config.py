"""Typed configuration: YAML files in `configs/` loaded into dataclasses.

A YAML file may name a `base:` file (relative to itself) whose values it extends. Any field can be
overridden from the command line as `section.field=value` (the value is parsed as YAML). Unknown keys,
values of the wrong type and impossible combinations raise `ConfigError` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or inconsistent; the message names the key."""


@dataclass
class VisionConfig:
    """CLIP ViT vision tower (HF `CLIPVisionModel` semantics)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    patch_size: int = 14
    # Input size the position table is built for (PixelLM: 448 -> 32x32 patches).
    image_size: int = 448
    # Size of the source checkpoint's position table (openai/clip-vit-large-patch14-336).
    pretrained_image_size: int = 336
    layer_norm_eps: float = 1e-5
    # Indices into hidden_states (len num_layers + 1; 0 = pre_layrnorm(embeddings)); negative
    # indices count from the end. PixelLM: [-2, -11] = layers 23 and 14 of ViT-L (deep, shallow).
    feature_layers: list[int] = field(default_factory=lambda: [-2, -11])
    # How a position table for image_size is derived from pretrained_image_size:
    # "official" = PixelLM's bilinear construction with its off-by-one; "hf" = transformers bicubic.
    position_interpolation: Literal["official", "hf"] = "official"
    # Train the tower too, with either train.trainable set. PixelLM keeps its pretrained CLIP frozen;
    # a model trained from scratch (the demo) needs features learned for its task.
    trainable: bool = False

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class TextConfig:
    """LLaMA decoder (HF `LlamaForCausalLM` semantics)."""

    vocab_size: int = 32009
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    # Rematerialisation of decoder layers: none | full | dots (save only matmul outputs).
    remat: Literal["none", "full", "dots"] = "none"
    # Run the decoder layers with nnx.scan over a stacked parameter axis.
    scan_layers: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class LoraConfig:
    """Low-rank adapters on LLaMA projections (PixelLM: q_proj, v_proj, r=8, alpha=16)."""

    enabled: bool = True
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass
class ProjectorConfig:
    """Vision -> LLM (`mm_projector`) and vision -> decoder (`out_mm_projector`) MLPs."""

    # Hidden width = hidden_mult * LLM hidden size (official: 2, i.e. 1024 -> 2H -> H).
    hidden_mult: int = 2
    # Side of the pooled image-token grid given to the LLM (official: 32x32 patches -> 16x16).
    llm_grid: int = 16
    # Separate out_mm_projector for the decoder features (official: true).
    separate_out_projector: bool = True


@dataclass
class HeadConfig:
    """Segmentation codebook, token fusion and multi-scale pixel decoder."""

    seg_token_num: int = 3  # N: tokens per level
    scale_num: int = 2  # L: feature levels (0 = deep, 1 = shallow)
    out_dim: int = 256
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    attention_downsample: int = 2
    num_mask_tokens: int = 4
    # "official": fixed weights 1/(N*L) per token; "paper": learned linear projection phi.
    token_fusion: Literal["official", "paper"] = "official"
    # "official": fixed 1/L per level; "paper": learned weights normalised to sum to 1.
    scale_fusion: Literal["official", "paper"] = "official"
    # Train the prompt encoder and neck (official keeps them frozen at their random init).
    train_prompt_encoder_and_neck: bool = False
    # Vocabulary ids of the N*L codebook tokens, in order. Empty = the last N*L rows of the
    # vocabulary. Converters fill it from the checkpoint's added-token table.
    seg_token_ids: list[int] = field(default_factory=list)
    # Most targets one conversation can carry in a batch (fixed shape for jit).
    max_targets: int = 8

    @property
    def num_seg_tokens(self) -> int:
        return self.seg_token_num * self.scale_num

    def seg_ids(self, vocab_size: int) -> tuple[int, ...]:
        """The codebook token ids (configured, or the last N*L vocabulary rows)."""
        if self.seg_token_ids:
            return tuple(self.seg_token_ids)
        return tuple(range(vocab_size - self.num_seg_tokens, vocab_size))


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    # Compute dtype, and storage dtype of frozen parameters initialised here (trainable ones are
    # always float32); a converted checkpoint stores each tensor as convert.param_dtype says.
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    frozen_param_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    # Attention kernel of LLaMA, CLIP and the SAM decoder (models/attention.py): "xla" is the
    # parity path; "jax" is jax.nn.dot_product_attention (cuDNN or XLA as jax picks); "cudnn" forces
    # cuDNN (GPU, needs dtype bfloat16); "pallas_tpu" is the Pallas splash kernel (TPU).
    attention: Literal["xla", "jax", "cudnn", "pallas_tpu"] = "xla"


@dataclass
class LossConfig:
    ce_weight: float = 1.0
    bce_weight: float = 2.0
    dice_weight: float = 0.5
    # Target refinement loss (paper): BCE weighted alpha on pixels where >= 2 masks overlap.
    refinement: bool = False
    refinement_alpha: float = 2.0
    refinement_weight: float = 2.0


@dataclass
class OptimConfig:
    """AdamW with linear warmup then linear decay (official DeepSpeed WarmupDecayLR)."""

    learning_rate: float = 3e-4
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.0
    warmup_steps: int = 100
    total_steps: int = 5000
    grad_clip: float = 1.0
    grad_accum_steps: int = 10
    micro_batch_size: int = 2


@dataclass
class MeshConfig:
    """Named device mesh; one axis may be -1 (all remaining devices)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclass
class DataConfig:
    # Training data: dataset specs (`pixellm_jax/data/specs.py`, the `pixellm eval --split` syntax),
    # e.g. "muse" (the official layout under train.dataset_dir) or "muse:json=my/train.json,images=my/img".
    datasets: list[str] = field(default_factory=lambda: ["sem_seg", "refer_seg", "vqa", "muse"])
    sample_rates: list[float] = field(default_factory=lambda: [2.0, 9.0, 2.0, 4.0])
    # Held-out splits (the same specs, in evaluation mode) scored every train.eval_every steps with their
    # protocol (referring: teacher-forced; MUSE: generated answers + Hungarian matching; `protocol=` picks).
    # Empty: the built-in held-out synthetic scenes when training on `synthetic`, else none.
    val: list[str] = field(default_factory=list)
    model_max_length: int = 512
    num_classes_per_sample: int = 3
    num_classes_per_question: int = 3
    # Input normalisation: "official" = ImageNet constants on 0-255; "clip" = CLIP constants.
    normalization: Literal["official", "clip"] = "official"
    # Batch shapes: optim.micro_batch_size images, this many conversation rows, token buckets.
    conversations_per_batch: int = 6
    token_buckets: list[int] = field(default_factory=lambda: [64, 128, 257])
    # Side of the ground-truth mask canvas; 0 = model.vision.image_size (see data/transforms.py).
    mask_size: int = 0
    use_im_start_end: bool = True
    epoch_size: int | None = None  # None: the most records with no source repeating within an epoch
    num_epochs: int | None = None  # None: endless
    drop_remainder: bool = True
    num_workers: int = 0  # Grain worker processes preparing records (0 = in the main process)
    worker_buffer_size: int = 2
    read_threads: int = 1
    prefetch_buffer_size: int = 8
    on_bad_sample: Literal["skip", "raise"] = "skip"
    # Stop when more than this fraction of the training data seen (conversations and bad records) was
    # dropped, naming the dominant reason; null = never stop (drops are still counted).
    max_drop_fraction: float | None = 0.2


@dataclass
class TrainConfig:
    """A training run (`pixellm train`): length, intervals, outputs, checkpoints, robustness.

    Intervals count optimizer steps (one step = optim.grad_accum_steps micro-batches); checkpoints
    are named by micro-batch count, so a resume is exact even mid-accumulation.
    """

    output_dir: str = "runs/pixellm"
    steps: int = 0  # optimizer steps to run; 0 = optim.total_steps
    log_every: int = 10
    eval_every: int = 0  # 0 = evaluate only at the end
    eval_batches: int = 8  # held-out batches per evaluation (0: no evaluation)
    eval_metric: str = "giou"  # evaluation metric (higher is better) that picks the best checkpoint
    save_every: int = 500  # 0 = save only at the end (and on preemption)
    keep: int = 3  # latest checkpoints kept, besides the best one by eval_metric
    async_checkpointing: bool = True
    resume: bool = True  # continue from the latest checkpoint in output_dir when there is one
    max_consecutive_nonfinite: int = 10  # that many skipped (non-finite) micro-batches in a row stop the run
    # Reject (skip) an update larger than this times the trainable parameters (global L2 norms), the
    # symptom of a learning rate far too large; 0 = no limit. Non-finite updated states are always rejected.
    max_update_ratio: float = 0.0
    # Resume from this checkpoint step instead of the newest one that verifies; -1 = the newest.
    resume_step: int = -1
    # "official": PixelLM's trainable set (models/trainable.py); "all": every parameter but the CLIP tower
    # (and it too with model.vision.trainable), for models trained from scratch (the demo), where a
    # frozen random LLM would be a poor start.
    trainable: Literal["official", "all"] = "official"
    # A `pixellm convert` output directory (LLaVA base, released PixelLM) whose weights start the run;
    # "" = random initialisation. Its tokenizer/ is the run's tokenizer unless `tokenizer` is set.
    init_from: str = ""
    # Tokenizer directory (LLaMA SentencePiece + tokenizer_config.json); "" = the init_from
    # checkpoint's, or else a small one built from the synthetic dataset's texts into output_dir (the demo).
    tokenizer: str = ""
    dataset_dir: str = "dataset"  # root of the real datasets, in the official `./dataset` layout
    synthetic_samples: int = 20000  # records of the built-in synthetic dataset (training split)
    overlays: int = 4  # mask overlay PNGs written after the final evaluation
    peak_tflops: float = 0.0  # per device, for the MFU estimate; 0 = from the device kind (unknown: none)
    progress: bool = True  # a progress bar when stdout is a terminal
    # Directory of JAX's persistent compilation cache ("" = none): a restarted or resumed run with the
    # same shapes skips compilation.
    compilation_cache: str = ""
    # Multi-host: "auto" initialises jax.distributed when the environment describes a cluster
    # (TPU pod, SLURM, JAX_COORDINATOR_ADDRESS); "off" never does.
    distributed: Literal["auto", "off"] = "auto"


@dataclass
class ConvertConfig:
    """`pixellm convert`: how converted tensors are stored."""

    # "source": each tensor keeps the dtype it has in the source files (a release's bf16 LLM and fp32
    # CLIP, neck and pixel modules stay so, and export gives back the same bytes); a dtype name stores
    # every floating-point tensor in it. Compute dtype (model.dtype) is chosen when the model is loaded.
    param_dtype: Literal["source", "float32", "bfloat16", "float16"] = "source"


@dataclass
class Config:
    name: str = ""
    seed: int = 0
    # "official" reproduces the released checkpoints; "paper" follows the paper where they differ.
    mode: Literal["official", "paper"] = "official"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    convert: ConvertConfig = field(default_factory=ConvertConfig)


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with type checking.


def _check_value(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_value(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"{key}: unknown key (known: {', '.join(sorted(names))})")
        kwargs[k] = _check_value(v, hints[k], key)
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'base' chain")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = data.pop("base", None)
    if base is not None:
        data = _merge(_read_yaml(path.parent / base, seen + (path,)), data)
    return data


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """A path to a YAML file, or the bare name of one in the project's `configs/` (a same-named folder
    in the working directory does not shadow it)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        return p.absolute()
    return CONFIG_DIR / f"{p}.yaml"


def apply_override(data: dict, override: str) -> dict:
    """Apply one `section.field=value` override to a raw config dict."""
    if "=" not in override:
        raise ConfigError(f"{override!r}: overrides are written section.field=value")
    key, raw = override.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from e
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, not a section")
        node = child
    node[parts[-1]] = value
    return data


def from_dict(data: dict) -> Config:
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def load_config(name_or_path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (path or bare name in `configs/`), apply overrides, type-check, validate."""
    path = resolve_config_path(name_or_path)
    data = _read_yaml(path)
    for o in overrides:
        data = apply_override(data, o)
    data.setdefault("name", path.stem)
    try:
        return from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _absolute(path: str, cwd: Path) -> str:
    if not path or "://" in path or Path(path).is_absolute():
        return path
    return str((cwd / path).absolute())


def resolve_paths(cfg: Config, cwd: str | os.PathLike | None = None) -> Config:
    """`cfg` with every path a user gives made absolute against `cwd` (default: the working directory):
    train.output_dir, init_from, tokenizer, dataset_dir, compilation_cache and the paths inside the
    dataset specs of data.datasets / data.val. URLs (gs://...) and absolute paths are kept."""
    from pixellm_jax.data.specs import absolute_spec

    base = Path(cwd) if cwd is not None else Path.cwd()
    tr = dataclasses.replace(cfg.train, **{
        k: _absolute(getattr(cfg.train, k), base)
        for k in ("output_dir", "init_from", "tokenizer", "dataset_dir", "compilation_cache")})
    data = dataclasses.replace(cfg.data, datasets=[absolute_spec(s, base) for s in cfg.data.datasets],
                               val=[absolute_spec(s, base) for s in cfg.data.val])
    return dataclasses.replace(cfg, train=tr, data=data)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Consistency checks across fields.


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _require_finite(node: Any, key: str) -> None:
    """Every float in the dataclass tree `node` (lists included) is finite (no NaN or infinity)."""
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            _require_finite(getattr(node, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(node, list):
        for i, x in enumerate(node):
            _require_finite(x, f"{key}[{i}]")
    elif isinstance(node, float):
        _require(math.isfinite(node), key, f"must be finite, got {node}")


def validate(cfg: Config) -> None:
    """Raise ConfigError for values outside their domain and impossible combinations, naming the key."""
    _require_finite(cfg, "")
    _require(0 <= cfg.seed < 2**32, "seed", "must be in [0, 2^32)")
    v, t, lo, h = cfg.model.vision, cfg.model.text, cfg.model.lora, cfg.model.head
    for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "patch_size", "image_size",
                 "pretrained_image_size"):
        _require(getattr(v, name) > 0, f"model.vision.{name}", "must be positive")
    _require(v.layer_norm_eps > 0, "model.vision.layer_norm_eps", "must be positive")
    _require(v.hidden_size % v.num_heads == 0, "model.vision.num_heads",
             f"must divide model.vision.hidden_size={v.hidden_size}")
    _require(v.image_size % v.patch_size == 0, "model.vision.image_size",
             f"must be a multiple of model.vision.patch_size={v.patch_size}")
    _require(v.pretrained_image_size % v.patch_size == 0, "model.vision.pretrained_image_size",
             f"must be a multiple of model.vision.patch_size={v.patch_size}")
    n_states = v.num_layers + 1
    for i, layer in enumerate(v.feature_layers):
        _require(-n_states <= layer < n_states, f"model.vision.feature_layers[{i}]",
                 f"{layer} is outside the {n_states} hidden states of a {v.num_layers}-layer tower")
    _require(len(v.feature_layers) >= 1, "model.vision.feature_layers", "needs at least one layer")

    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "max_position_embeddings", "rms_norm_eps", "rope_theta"):
        _require(getattr(t, name) > 0, f"model.text.{name}", "must be positive")
    _require(t.hidden_size % t.num_heads == 0, "model.text.num_heads",
             f"must divide model.text.hidden_size={t.hidden_size}")
    _require(t.head_dim % 2 == 0, "model.text.num_heads", f"gives odd head_dim={t.head_dim}; RoPE needs even")
    _require(t.num_heads % t.num_kv_heads == 0, "model.text.num_kv_heads",
             f"must divide model.text.num_heads={t.num_heads}")

    if lo.enabled:
        _require(lo.rank > 0, "model.lora.rank", "must be positive")
        _require(lo.alpha > 0, "model.lora.alpha", "must be positive")
        _require(0.0 <= lo.dropout < 1.0, "model.lora.dropout", "must be in [0, 1)")
        allowed = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        for i, tgt in enumerate(lo.targets):
            _require(tgt in allowed, f"model.lora.targets[{i}]", f"{tgt!r} is not one of {sorted(allowed)}")

    p = cfg.model.projector
    _require(p.hidden_mult > 0, "model.projector.hidden_mult", "must be positive")
    _require(p.llm_grid > 0 and v.grid % p.llm_grid == 0, "model.projector.llm_grid",
             f"must divide the vision grid {v.grid} (= image_size / patch_size)")

    for name in ("seg_token_num", "scale_num", "out_dim", "decoder_depth", "decoder_heads", "decoder_mlp_dim",
                 "attention_downsample"):
        _require(getattr(h, name) >= 1, f"model.head.{name}", "must be >= 1")
    _require(h.scale_num <= len(v.feature_layers), "model.head.scale_num",
             f"needs that many model.vision.feature_layers (have {len(v.feature_layers)})")
    _require(h.out_dim % h.decoder_heads == 0, "model.head.decoder_heads", f"must divide out_dim={h.out_dim}")
    attention_dim = h.out_dim // h.attention_downsample
    _require(attention_dim > 0 and attention_dim % h.decoder_heads == 0, "model.head.attention_downsample",
             "out_dim / attention_downsample must be a positive multiple of decoder_heads")
    _require(h.out_dim % 8 == 0, "model.head.out_dim", "must be a multiple of 8 (upscaling to out_dim/8)")
    _require(h.num_mask_tokens >= 1, "model.head.num_mask_tokens", "must be >= 1")
    _require(h.max_targets >= 1, "model.head.max_targets", "must be >= 1")
    if h.seg_token_ids:
        _require(len(h.seg_token_ids) == h.num_seg_tokens, "model.head.seg_token_ids",
                 f"needs seg_token_num * scale_num = {h.num_seg_tokens} ids, got {len(h.seg_token_ids)}")
        _require(len(set(h.seg_token_ids)) == len(h.seg_token_ids), "model.head.seg_token_ids", "ids must differ")
        for i, tid in enumerate(h.seg_token_ids):
            _require(0 <= tid < t.vocab_size, f"model.head.seg_token_ids[{i}]",
                     f"{tid} is outside the vocabulary of model.text.vocab_size={t.vocab_size}")
    else:
        _require(t.vocab_size >= h.num_seg_tokens, "model.head.seg_token_ids", "vocabulary too small")

    if cfg.mode == "official":
        _require(h.token_fusion == "official", "model.head.token_fusion",
                 "mode 'official' needs token_fusion 'official' (released checkpoints use fixed weights)")
        _require(h.scale_fusion == "official", "model.head.scale_fusion",
                 "mode 'official' needs scale_fusion 'official'")
        _require(not cfg.loss.refinement, "loss.refinement", "mode 'official' has no target refinement loss")

    _require(cfg.model.attention != "cudnn" or cfg.model.dtype == "bfloat16", "model.attention",
             "'cudnn' runs in bfloat16 only; set model.dtype=bfloat16 or use 'jax'")

    ls = cfg.loss
    for name in ("ce_weight", "bce_weight", "dice_weight", "refinement_weight"):
        _require(getattr(ls, name) >= 0, f"loss.{name}", "must be >= 0")
    mask_weight = ("refinement_weight", ls.refinement_weight) if ls.refinement else ("bce_weight", ls.bce_weight)
    _require(ls.ce_weight + ls.dice_weight + mask_weight[1] > 0, "loss",
             f"ce_weight, dice_weight and {mask_weight[0]} are all 0: nothing would be learned")
    _require(ls.refinement_alpha >= 1.0, "loss.refinement_alpha", "must be >= 1")
    o = cfg.optim
    _require(o.learning_rate > 0, "optim.learning_rate", "must be positive")
    _require(0 <= o.b1 < 1, "optim.b1", "must be in [0, 1)")
    _require(0 <= o.b2 < 1, "optim.b2", "must be in [0, 1)")
    _require(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _require(o.grad_clip > 0, "optim.grad_clip",
             "must be positive: gradients are clipped to this global norm (0 would zero them, not disable clipping)")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _require(o.total_steps >= 1, "optim.total_steps", "must be >= 1")
    _require(o.warmup_steps <= o.total_steps, "optim.warmup_steps", f"exceeds optim.total_steps={o.total_steps}")
    _require(o.grad_accum_steps >= 1, "optim.grad_accum_steps", "must be >= 1")
    _require(o.micro_batch_size >= 1, "optim.micro_batch_size", "must be >= 1")

    m = cfg.mesh
    sizes = {"data": m.data, "fsdp": m.fsdp, "tensor": m.tensor}
    for k, s in sizes.items():
        _require(s == -1 or s >= 1, f"mesh.{k}", "must be >= 1 or -1")
    _require(sum(s == -1 for s in sizes.values()) <= 1, "mesh", "at most one axis may be -1")

    d = cfg.data
    from pixellm_jax.data.specs import SpecError, parse_spec

    for key, specs in (("data.datasets", d.datasets), ("data.val", d.val)):
        for i, spec in enumerate(specs):
            try:
                parse_spec(spec)
            except SpecError as e:
                raise ConfigError(f"{key}[{i}]: {e}") from None
    _require(len(d.datasets) == len(d.sample_rates), "data.sample_rates",
             f"needs one rate per entry of data.datasets ({len(d.datasets)})")
    _require(d.max_drop_fraction is None or 0 <= d.max_drop_fraction <= 1, "data.max_drop_fraction",
             "must be in [0, 1] or null")
    for i, r in enumerate(d.sample_rates):
        _require(r >= 0, f"data.sample_rates[{i}]", "must be >= 0")
    _require(any(r > 0 for r in d.sample_rates), "data.sample_rates", "needs at least one rate > 0")
    _require(d.model_max_length > 0, "data.model_max_length", "must be positive")
    n_img = cfg.model.projector.llm_grid ** 2
    _require(d.model_max_length > n_img - 1, "data.model_max_length",
             f"must exceed the {n_img} image tokens minus one")
    for name in ("num_classes_per_sample", "num_classes_per_question", "conversations_per_batch",
                 "worker_buffer_size"):
        _require(getattr(d, name) >= 1, f"data.{name}", "must be >= 1")
    _require(len(d.token_buckets) > 0 and d.token_buckets == sorted(set(d.token_buckets)) and d.token_buckets[0] > 0,
             "data.token_buckets", "must be positive and strictly increasing")
    _require(d.mask_size >= 0, "data.mask_size", "must be >= 0 (0 = image size)")
    _require(d.epoch_size is None or d.epoch_size > 0, "data.epoch_size", "must be positive or null")
    _require(d.num_epochs is None or d.num_epochs > 0, "data.num_epochs", "must be positive or null")
    for name in ("num_workers", "read_threads", "prefetch_buffer_size"):
        _require(getattr(d, name) >= 0, f"data.{name}", "must be >= 0")

    tr = cfg.train
    _require(bool(tr.output_dir), "train.output_dir", "must not be empty")
    for name in ("steps", "eval_every", "eval_batches", "save_every"):
        _require(getattr(tr, name) >= 0, f"train.{name}", "must be >= 0")
    for name in ("log_every", "keep", "max_consecutive_nonfinite"):
        _require(getattr(tr, name) >= 1, f"train.{name}", "must be >= 1")
    _require(tr.synthetic_samples >= 1, "train.synthetic_samples", "must be >= 1")
    _require(tr.overlays >= 0, "train.overlays", "must be >= 0")
    _require(tr.peak_tflops >= 0, "train.peak_tflops", "must be >= 0")
    _require(tr.max_update_ratio >= 0, "train.max_update_ratio", "must be >= 0 (0 = no limit)")
    _require(tr.resume_step >= -1, "train.resume_step", "must be a checkpoint step, or -1 for the newest")
