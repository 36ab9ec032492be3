"""Declarative key tables: PyTorch state-dict key <-> pixellm-jax parameter path, plus a named transform.

A `Rule` pairs a source-key template with a target-path template. `{name}` placeholders stand for
integer indices and appear in both templates, except the rule's `stack` placeholder: it appears only
in the source key and selects a slice of the target's leading (layer) axis. So HF's
`model.layers.{layer}.self_attn.q_proj.weight` is slice `layer` of `llm/layers/self_attn/q_proj/kernel`
(LLaMA's decoder layers are one stacked module, see models/llama.py). The same rule serves import
(key -> path) and export (path -> keys). `grow` names a target axis along which the source may hold
fewer entries (vocabulary rows added for the codebook); `group` names rules that load all or none
(a projector whose shape differs is skipped whole, never half-loaded).

Keys a table consumes without loading are listed with a reason: `ignore` (dropped: RoPE buffers, the
CLIP text tower, ...) and `keep` (SAM prompt-encoder parts PixelLM never uses, stored verbatim beside
the parameters so an export reproduces them).

Transforms are named in rules and resolved by `transforms_for(vision_config)`: axis permutations
(optionally flipping target axes), which also map a target slice to the source slice it needs, and
the CLIP position-table interpolation (`models/clip_positions.py`), which reads whole tables.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from pixellm_jax.config import VisionConfig
from pixellm_jax.models.clip_positions import resize_position_table

Index = tuple[slice, ...]

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


# ---------------------------------------------------------------------------------------------
# Transforms


@dataclass(frozen=True)
class Permute:
    """target = flip(transpose(source, perm), flip); perm None keeps the axes (any rank)."""

    name: str
    perm: tuple[int, ...] | None
    flip: tuple[int, ...] = ()

    def forward(self, x: np.ndarray) -> np.ndarray:
        y = x if self.perm is None else np.transpose(x, self.perm)
        return np.flip(y, self.flip) if self.flip else y

    def inverse(self, x: np.ndarray) -> np.ndarray:
        y = np.flip(x, self.flip) if self.flip else x
        return y if self.perm is None else np.transpose(y, np.argsort(self.perm))

    def target_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.perm is None:
            return tuple(shape)
        if len(shape) != len(self.perm):
            return ()  # never equal to a real target shape: reported as a wrong shape
        return tuple(shape[a] for a in self.perm)

    def source_index(self, index: Index, source_shape: tuple[int, ...]) -> Index:
        """The source slice whose forward transform is `target[index]` (contiguous slices only)."""
        perm = self.perm if self.perm is not None else tuple(range(len(source_shape)))
        target_shape = self.target_shape(source_shape)
        out: list[slice] = [slice(None)] * len(source_shape)
        for axis, s in enumerate(index):
            start, stop, step = s.indices(target_shape[axis])
            if step != 1:
                raise ValueError(f"{self.name}: only contiguous slices can be mapped, got {s}")
            if axis in self.flip:
                n = target_shape[axis]
                start, stop = n - stop, n - start
            out[perm[axis]] = slice(start, stop)
        return tuple(out)


@dataclass(frozen=True)
class PositionTable:
    """CLIP position table [1 + g*g, D] -> [1 + grid*grid, D] by `method` ("official" or "hf").

    Kept as is when the grids already agree. The export direction writes the table as stored (the
    pretrained table cannot be recovered from an interpolated one).
    """

    grid: int
    method: str
    name: str = "position_table"

    def forward(self, x: np.ndarray) -> np.ndarray:
        if x.ndim == 2 and x.shape[0] == self.grid * self.grid + 1:
            return x
        return resize_position_table(x, self.grid, self.method)

    def inverse(self, x: np.ndarray) -> np.ndarray:
        return x

    def target_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(shape) != 2:
            return ()
        g = int(round(np.sqrt(shape[0] - 1)))
        if g * g + 1 != shape[0]:
            return ()
        return (self.grid * self.grid + 1, shape[1])

    def source_index(self, index: Index, source_shape: tuple[int, ...]) -> None:
        return None  # every output row depends on several source rows: read the whole table


Transform = Permute | PositionTable

PERMUTATIONS: dict[str, Permute] = {
    "identity": Permute("identity", None),
    # nn.Linear weight [out, in] -> kernel [in, out]
    "transpose": Permute("transpose", (1, 0)),
    # nn.Conv2d weight OIHW -> HWIO
    "conv": Permute("conv", (2, 3, 1, 0)),
    # nn.ConvTranspose2d weight [in, out, kh, kw] -> [kh, kw, in, out] with both spatial axes flipped
    # (the mapping verified in tests/models/test_sam_layers.py)
    "conv_transpose": Permute("conv_transpose", (2, 3, 0, 1), (0, 1)),
}


def transforms_for(vision: VisionConfig) -> dict[str, Transform]:
    """Every named transform, the position table built for `vision`'s grid and interpolation."""
    return {**PERMUTATIONS, "position_table": PositionTable(vision.grid, vision.position_interpolation)}


# ---------------------------------------------------------------------------------------------
# Rules and tables


def _template_regex(template: str) -> re.Pattern:
    parts, pos = [], 0
    for m in _PLACEHOLDER.finditer(template):
        parts.append(re.escape(template[pos: m.start()]))
        parts.append(f"(?P<{m.group(1)}>\\d+)")
        pos = m.end()
    parts.append(re.escape(template[pos:]))
    return re.compile("".join(parts))


@dataclass(frozen=True)
class Rule:
    """One source-key template <-> one target-path template (see the module docstring)."""

    source: str
    target: str
    transform: str = "identity"
    stack: str | None = None
    grow: int | None = None
    group: str | None = None

    def __post_init__(self):
        src = set(_PLACEHOLDER.findall(self.source))
        tgt = set(_PLACEHOLDER.findall(self.target))
        want = tgt | ({self.stack} if self.stack else set())
        if src != want or (self.stack and self.stack in tgt):
            raise ValueError(f"rule {self.source!r} -> {self.target!r}: placeholders do not correspond")

    @cached_property
    def _source_re(self) -> re.Pattern:
        return _template_regex(self.source)

    @cached_property
    def _target_re(self) -> re.Pattern:
        return _template_regex(self.target)

    def match_source(self, key: str) -> tuple[str, int | None] | None:
        """(target path, layer index or None) for a source key this rule covers, else None."""
        m = self._source_re.fullmatch(key)
        if m is None:
            return None
        values = {k: int(v) for k, v in m.groupdict().items()}
        layer = values.pop(self.stack) if self.stack else None
        return self.target.format(**values), layer

    def match_target(self, path: str) -> dict[str, int] | None:
        """The placeholder values of a target path this rule produces, else None."""
        m = self._target_re.fullmatch(path)
        return None if m is None else {k: int(v) for k, v in m.groupdict().items()}

    def source_key(self, values: dict[str, int], layer: int | None = None) -> str:
        if self.stack:
            values = {**values, self.stack: layer}
        return self.source.format(**values)


@dataclass(frozen=True)
class Skip:
    """Source keys (regex, full match) consumed without loading them, and why."""

    pattern: str
    reason: str

    @cached_property
    def _re(self) -> re.Pattern:
        return re.compile(self.pattern)

    def matches(self, key: str) -> bool:
        return self._re.fullmatch(key) is not None


@dataclass(frozen=True)
class Table:
    """Rules (first match wins, in order) plus the keys ignored or kept verbatim."""

    name: str
    rules: tuple[Rule, ...]
    ignore: tuple[Skip, ...] = ()
    keep: tuple[Skip, ...] = ()

    def rule_for_key(self, key: str) -> tuple[Rule, str, int | None] | None:
        for rule in self.rules:
            hit = rule.match_source(key)
            if hit is not None:
                return rule, hit[0], hit[1]
        return None

    def ignored(self, key: str) -> str | None:
        return next((s.reason for s in self.ignore if s.matches(key)), None)

    def kept(self, key: str) -> str | None:
        return next((s.reason for s in self.keep if s.matches(key)), None)

    def rule_for_target(self, path: str) -> tuple[Rule, dict[str, int]] | None:
        """The first rule producing `path` (the key name an export writes), with its placeholder values."""
        for rule in self.rules:
            values = rule.match_target(path)
            if values is not None:
                return rule, values
        return None


# ---------------------------------------------------------------------------------------------
# Rule builders for the module kinds (PyTorch name -> NNX name)


def _linear(src: str, dst: str, *, bias: bool = True, stack: str | None = None, grow: int | None = None,
            group: str | None = None) -> list[Rule]:
    rules = [Rule(f"{src}.weight", f"{dst}/kernel", "transpose", stack=stack, grow=grow, group=group)]
    if bias:
        rules.append(Rule(f"{src}.bias", f"{dst}/bias", stack=stack, group=group))
    return rules


def _layer_norm(src: str, dst: str) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}/scale"), Rule(f"{src}.bias", f"{dst}/bias")]


def _embedding(src: str, dst: str, grow: int | None = None) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}/embedding", grow=grow)]


def _projector(src: str, dst: str, first: str, second: str, group: str) -> list[Rule]:
    """Linear -> GELU -> Linear: `mm_projector.{0,2}` (LLaVA, PixelLM) or `linear_{1,2}` (llava-hf)."""
    return _linear(f"{src}.{first}", f"{dst}/linear_1", group=group) + _linear(
        f"{src}.{second}", f"{dst}/linear_2", group=group
    )


def llama_rules(model: str, head: str) -> list[Rule]:
    """`LlamaForCausalLM` keys under `model` (e.g. "model.") with `lm_head` under `head`."""
    layer = model + "layers.{layer}."
    rules = _embedding(f"{model}embed_tokens", "llm/embed_tokens", grow=0)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        rules += _linear(layer + f"self_attn.{name}", f"llm/layers/self_attn/{name}", bias=False, stack="layer")
    for name in ("gate_proj", "up_proj", "down_proj"):
        rules += _linear(layer + f"mlp.{name}", f"llm/layers/mlp/{name}", bias=False, stack="layer")
    for name in ("input_layernorm", "post_attention_layernorm"):
        rules.append(Rule(layer + f"{name}.weight", f"llm/layers/{name}/weight", stack="layer"))
    rules.append(Rule(f"{model}norm.weight", "llm/norm/weight"))
    rules += _linear(f"{head}lm_head", "llm/lm_head", bias=False, grow=1)
    return rules


LLAMA_IGNORE = (
    Skip(r"(.*\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq", "RoPE buffer (recomputed from rope_theta)"),
)


def clip_rules(prefix: str) -> list[Rule]:
    """HF `CLIPVisionModel` keys under `prefix` ("vision_model.", or "" for the flattened 5.x layout)."""
    emb, tower = f"{prefix}embeddings.", "vision_tower/"
    rules = [
        Rule(emb + "class_embedding", tower + "embeddings/class_embedding"),
        Rule(emb + "patch_embedding.weight", tower + "embeddings/patch_embedding/kernel", "conv"),
        Rule(emb + "position_embedding.weight", tower + "embeddings/position_embedding", "position_table"),
    ]
    rules += _layer_norm(f"{prefix}pre_layrnorm", tower + "pre_layrnorm")
    src, dst = prefix + "encoder.layers.{i}.", tower + "encoder/layers/{i}/"
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        rules += _linear(src + f"self_attn.{name}", dst + f"self_attn/{name}")
    for name in ("fc1", "fc2"):
        rules += _linear(src + f"mlp.{name}", dst + f"mlp/{name}")
    for name in ("layer_norm1", "layer_norm2"):
        rules += _layer_norm(src + name, dst + name)
    return rules


def clip_ignore(prefix: str) -> list[Skip]:
    return [Skip(re.escape(prefix) + r"embeddings\.position_ids", "position-id buffer of old CLIP files")]


def clip_keep(prefix: str) -> list[Skip]:
    return [Skip(re.escape(prefix) + r"post_layernorm\.(weight|bias)",
                 "post_layernorm: PixelLM and LLaVA read hidden states before it (kept for a llava-hf export)")]


CLIP_MODEL_IGNORE = [
    Skip(r"text_model\..*", "CLIP text tower (not used)"),
    Skip(r"(visual_projection|text_projection)\.weight", "CLIP contrastive projection (not used)"),
    Skip(r"logit_scale", "CLIP contrastive temperature (not used)"),
]


def pixellm_head_rules(p: str = "model.") -> list[Rule]:
    """PixelLM's additions, in the official state-dict order: projectors, prompt encoder, mask decoder,
    neck, text_hidden_fcs."""
    rules = _projector(p + "mm_projector", "mm_projector", "0", "2", group="mm_projector")
    rules += _projector(p + "out_mm_projector", "out_mm_projector", "0", "2", group="out_mm_projector")
    rules.append(Rule(p + "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
                      "prompt_encoder/pe_layer/positional_encoding_gaussian_matrix"))
    rules += _embedding(p + "prompt_encoder.no_mask_embed", "prompt_encoder/no_mask_embed")

    md, dst = p + "mask_decoder.", "mask_decoder/"
    block, block_dst = md + "transformer.{t}.layers.{l}.", dst + "transformer/{t}/layers/{l}/"
    for attn in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token"):
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            rules += _linear(block + f"{attn}.{name}", block_dst + f"{attn}/{name}")
    rules += _layer_norm(block + "norm{n}", block_dst + "norm{n}")
    rules += _linear(block + "mlp.lin{n}", block_dst + "mlp/lin{n}")
    final, final_dst = md + "transformer.{t}.", dst + "transformer/{t}/"
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        rules += _linear(final + f"final_attn_token_to_image.{name}", final_dst + f"final_attn_token_to_image/{name}")
    rules += _layer_norm(final + "norm_final_attn", final_dst + "norm_final_attn")
    for name in ("iou_token", "mask_tokens", "level_embed"):
        rules += _embedding(md + name, dst + name)
    rules.append(Rule(md + "pe1.positional_encoding_gaussian_matrix", dst + "pe1/positional_encoding_gaussian_matrix"))
    for name in ("output_upscaling", "upsample_2x"):
        rules += [
            Rule(md + f"{name}.0.weight", dst + f"{name}/layers/0/kernel", "conv_transpose"),
            Rule(md + f"{name}.0.bias", dst + f"{name}/layers/0/bias"),
        ]
        rules += _layer_norm(md + f"{name}.1", dst + f"{name}/layers/1")
    rules += _linear(md + "output_hypernetworks_mlps.{k}.layers.{j}", dst + "output_hypernetworks_mlps/{k}/layers/{j}")
    rules += _linear(md + "iou_prediction_head.layers.{j}", dst + "iou_prediction_head/layers/{j}")
    neck, neck_dst = p + "image_feature_neck.", "image_feature_neck/layers/"
    rules += [Rule(neck + "0.weight", neck_dst + "0/kernel", "conv")] + _layer_norm(neck + "1", neck_dst + "1")
    rules += [Rule(neck + "2.weight", neck_dst + "2/kernel", "conv")] + _layer_norm(neck + "3", neck_dst + "3")
    rules += _linear(p + "text_hidden_fcs.0.0", "text_hidden_fcs/fc1")
    rules += _linear(p + "text_hidden_fcs.0.2", "text_hidden_fcs/fc2")
    return rules


PROMPT_ENCODER_KEEP = (
    Skip(
        r"model\.prompt_encoder\.(point_embeddings\.\d+\.weight|not_a_point_embed\.weight"
        r"|mask_downscaling\.\d+\.(weight|bias))",
        "SAM prompt-encoder part PixelLM never uses (kept verbatim for export)",
    ),
)


def pixellm_release_table() -> Table:
    """A released PixelLM `hf_model/` (LoRA merged; no CLIP weights)."""
    llama = llama_rules("model.", "")
    rules = llama[:-1] + pixellm_head_rules("model.") + llama[-1:]  # official key order: lm_head last
    return Table("PixelLM release", tuple(rules), ignore=LLAMA_IGNORE, keep=PROMPT_ENCODER_KEEP)


def clip_table() -> Table:
    """An OpenAI CLIP checkpoint: full `CLIPModel` (text tower ignored) or `CLIPVisionModel`, either prefix."""
    return Table("CLIP", tuple(clip_rules("vision_model.") + clip_rules("")),
                 ignore=tuple(CLIP_MODEL_IGNORE + clip_ignore("vision_model.") + clip_ignore("")),
                 keep=tuple(clip_keep("vision_model.") + clip_keep("")))


def llava_hf_table() -> Table:
    """`LlavaForConditionalGeneration` files: hub layout first (what exports write), then the flattened
    vision prefix of transformers >= 5.6, then the in-memory names (`save_original_format=False`)."""
    rules = llama_rules("language_model.model.", "language_model.") + llama_rules("model.language_model.", "")
    ignore, keep = list(LLAMA_IGNORE), []
    for prefix in ("vision_tower.vision_model.", "vision_tower.", "model.vision_tower."):
        rules += clip_rules(prefix)
        ignore += clip_ignore(prefix)
        keep += clip_keep(prefix)
    rules += _projector("multi_modal_projector", "mm_projector", "linear_1", "linear_2", group="mm_projector")
    rules += _projector("model.multi_modal_projector", "mm_projector", "linear_1", "linear_2", group="mm_projector")
    return Table("llava-hf", tuple(rules), ignore=tuple(ignore), keep=tuple(keep))


LLAVA_V1_PROJECTOR = Skip(
    r"model\.mm_projector\.(weight|bias)",
    "LLaVA v1 single-Linear projector: PixelLM's mm_projector is Linear-GELU-Linear, so it is initialised "
    "instead (the official PixelLM code also builds a new one)",
)


def llava_table() -> Table:
    """Original haotian-liu LLaVA (`LlavaLlamaForCausalLM`): v1.5 `mlp2x_gelu` or v1 linear projector."""
    prefix = "model.vision_tower.vision_tower.vision_model."
    rules = llama_rules("model.", "") + _projector("model.mm_projector", "mm_projector", "0", "2", group="mm_projector")
    rules += clip_rules(prefix)
    return Table("LLaVA", tuple(rules), ignore=tuple(list(LLAMA_IGNORE) + [LLAVA_V1_PROJECTOR] + clip_ignore(prefix)),
                 keep=tuple(clip_keep(prefix)))


ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def peft_table(targets: list[str] | tuple[str, ...]) -> Table:
    """A peft LoRA adapter on `LlamaForCausalLM`-named modules (`base_model.model.model.layers.{i}...`)."""
    rules = []
    for name in targets:
        sub = "self_attn" if name in ATTENTION_PROJECTIONS else "mlp"
        src = "base_model.model.model.layers.{layer}." + f"{sub}.{name}"
        dst = f"llm/layers/{sub}/{name}"
        rules.append(Rule(src + ".lora_A.weight", dst + "/lora_a", "transpose", stack="layer"))
        rules.append(Rule(src + ".lora_B.weight", dst + "/lora_b", "transpose", stack="layer"))
    return Table("peft LoRA", tuple(rules))
