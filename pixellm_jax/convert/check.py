"""`pixellm convert --check`: the converted model against PyTorch built from the source tensors.

Two checks, both must pass (`CheckReport.passed`, `pixellm convert --check` exits 1 otherwise):

1. **Stored tensors**: every source tensor, transformed as the plan says (transpose, position table,
   vocabulary rows), is compared byte for byte with what the checkpoint stores. A tensor stored in
   another dtype than its source (an explicit `convert.param_dtype`) is reported as rounded and fails
   the check: the conversion is then not exact.
2. **The whole model, stage by stage**: one square image (no padding, so no key masks) and a
   question with an answer holding two codebook groups go through transformers' `CLIPVisionModel`
   (the position table interpolated as the config says, in torch), the pixel head of
   `torch_pixellm.py` (projectors, `text_hidden_fcs` + token fusion, neck, mask decoder, post-
   processing) and transformers' `LlamaForCausalLM` on `inputs_embeds` with the image tokens spliced
   at the sentinel; and through the converted model (`Predictor.intermediates`), both in float32.
   Compared per stage: max |torch - jax|, against a tolerance of 1e-4 x max(1, max |torch|) (float32
   arithmetic on both sides from the same values; a stage computed from rounded tensors exceeds it),
   and the fraction of final mask pixels whose sign differs (at most 1e-3).

The PyTorch side holds the source's tensors; parameters the conversion initialised (a LLaVA base has
no pixel head, LoRA factors, new vocabulary rows) are taken from the checkpoint, so those stages
check the implementation rather than a conversion (the report says which).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pixellm_jax.config import Config
from pixellm_jax.convert.errors import ConversionError
from pixellm_jax.convert.readers import to_torch
from pixellm_jax.convert.stream import grown_slice
from pixellm_jax.convert.tables import PERMUTATIONS, Table, clip_rules, llama_rules, pixellm_head_rules
from pixellm_jax.convert.validate import Plan

DEFAULT_PROMPT = "What is in this image? Please segment the two largest objects."
ANSWER = "Sure, they are [SEG] and [SEG]."
TOLERANCE = 1e-4  # relative to max(1, max |reference|)
MAX_SIGN_FLIPS = 1e-3  # fraction of final mask pixels
CANONICAL = Table("canonical", tuple(llama_rules("model.", "") + clip_rules("vision_model.")
                                     + pixellm_head_rules("model.")))


@dataclass
class Stage:
    name: str
    max_abs_diff: float
    scale: float  # max |reference|
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= TOLERANCE * max(1.0, self.scale)


@dataclass
class CheckReport:
    exact: int = 0  # source tensors stored byte for byte
    rounded: list[str] = field(default_factory=list)  # "key: source dtype -> stored dtype"
    differ: list[str] = field(default_factory=list)  # stored values that are not the source's
    stages: list[Stage] = field(default_factory=list)
    sign_flips: float = 0.0  # fraction of final mask pixels whose sign differs
    mask_pixels: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (not self.rounded and not self.differ and all(s.passed for s in self.stages)
                and self.sign_flips <= MAX_SIGN_FLIPS)

    def __str__(self) -> str:
        lines = [f"check: stored tensors: {self.exact} byte for byte as the source"
                 + (f", {len(self.rounded)} rounded" if self.rounded else "")
                 + (f", {len(self.differ)} DIFFERENT" if self.differ else "")]
        lines += [f"  rounded: {r}" for r in self.rounded[:8]] + [f"  differs: {d}" for d in self.differ[:8]]
        for s in self.stages:
            verdict = "ok" if s.passed else "FAIL"
            lines.append(f"check: {s.name}: max |torch - jax| = {s.max_abs_diff:.3g} (values up to {s.scale:.3g}) "
                         f"{verdict}{f' ({s.note})' if s.note else ''}")
        if self.mask_pixels:
            lines.append(f"check: final masks: {self.sign_flips:.3g} of {self.mask_pixels} pixels change sign "
                         f"{'ok' if self.sign_flips <= MAX_SIGN_FLIPS else 'FAIL'}")
        lines += [f"check: note: {n}" for n in self.notes]
        lines.append(f"check: {'passed' if self.passed else 'FAILED'} (tolerance {TOLERANCE:g} x max(1, |torch|), "
                     f"sign changes <= {MAX_SIGN_FLIPS:g})")
        return "\n".join(lines)


def check_stored(params: dict[str, np.ndarray], plan: Plan, report: CheckReport) -> None:
    """Every loaded source tensor against the stored parameter (see the module docstring)."""
    for load in plan.loads:
        x = np.asarray(load.transform.forward(load.reader.read(load.info.key)))
        stored = np.asarray(params[load.target])
        if load.layer is not None:
            stored = stored[load.layer]
        if load.grow is not None:
            stored = stored[grown_slice(load, x)]
        name = load.info.key + (f" -> {load.target}[{load.layer}]" if load.layer is not None else f" -> {load.target}")
        same_bytes = stored.shape == x.shape and np.array_equal(
            stored.view(np.uint8), np.ascontiguousarray(x.astype(stored.dtype, copy=False)).view(np.uint8))
        if not same_bytes:
            report.differ.append(name)
        elif stored.dtype != x.dtype:
            report.rounded.append(f"{name}: {x.dtype} -> {stored.dtype}")
        else:
            report.exact += 1


def canonical_state(plan: Plan, params: dict[str, np.ndarray]) -> tuple[dict, set[str]]:
    """Torch fp32 tensors under transformers / official names: the source's where the plan loads them,
    the checkpoint's (inverse-transformed) for parameters the conversion initialised or grew.

    Returns (state, keys taken from the checkpoint)."""
    import torch

    state, from_checkpoint = {}, set()
    loaded = plan.by_target()
    for path, value in params.items():
        hit = CANONICAL.rule_for_target(path)
        if hit is None:
            continue
        rule, values = hit
        loads = loaded.get(path, [])
        if loads and all(ld.grow is None for ld in loads):
            for ld in loads:
                state[rule.source_key(values, ld.layer)] = to_torch(
                    ld.reader.read(ld.info.key).astype(np.float32))
            continue
        permute = PERMUTATIONS.get(rule.transform)  # None: the position table, stored as built
        layers = range(value.shape[0]) if rule.stack else [None]
        for layer in layers:
            x = np.asarray(value[layer] if layer is not None else value, np.float32)
            key = rule.source_key(values, layer)
            state[key] = torch.from_numpy(np.array(x if permute is None else permute.inverse(x)))
            from_checkpoint.add(key)
    return state, from_checkpoint


def torch_clip(state: dict, cfg: Config):
    """transformers `CLIPVisionModel` (float32) on the source's vision tensors, position table
    interpolated the configured way; returns a function pixels [B, S, S, 3] -> feature levels."""
    import torch
    import torch.nn.functional as F
    from transformers import CLIPVisionConfig, CLIPVisionModel

    v = cfg.model.vision
    table = state["vision_model.embeddings.position_embedding.weight"]
    official = v.position_interpolation == "official" and table.shape[0] != v.grid ** 2 + 1
    config = CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                              num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads, patch_size=v.patch_size,
                              image_size=v.image_size if official or table.shape[0] == v.grid ** 2 + 1
                              else v.pretrained_image_size,
                              hidden_act="quick_gelu", layer_norm_eps=v.layer_norm_eps, attn_implementation="eager")
    model = CLIPVisionModel(config).eval()
    vision = {k[len("vision_model."):]: t for k, t in state.items() if k.startswith("vision_model.")}
    if official:  # PixelLM's clip_encoder.py: the LAST row is "cls", rows 0..g0^2-1 are the grid (§1.2)
        g0 = int(round((table.shape[0] - 1) ** 0.5))
        grid = table[: g0 * g0].T.reshape(1, -1, g0, g0)
        grid = F.interpolate(grid, size=(v.grid, v.grid), mode="bilinear", align_corners=False)
        vision["embeddings.position_embedding.weight"] = torch.cat([grid.reshape(-1, v.grid ** 2).T, table[-1:]])
    tower = getattr(model, "vision_model", model)  # transformers 5 flattens CLIPVisionModel
    missing, unexpected = tower.load_state_dict(vision, strict=False)
    if unexpected or [k for k in missing if not k.startswith("post_layernorm")]:
        raise ConversionError(f"check: CLIP tensors do not fit CLIPVisionModel: missing {missing}, "
                              f"unexpected {unexpected}")
    layers = [i % (v.num_layers + 1) for i in v.feature_layers]

    def features(pixels: np.ndarray) -> list:
        with torch.no_grad():
            out = model(torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True,
                        interpolate_pos_encoding=not official and table.shape[0] != v.grid ** 2 + 1)
        return [out.hidden_states[i][:, 1:] for i in layers]

    return features


def torch_llama(state: dict, cfg: Config):
    """transformers `LlamaForCausalLM` (float32) holding the language-model tensors of `state`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    t = cfg.model.text
    llm = {k: v for k, v in state.items() if k.startswith(("model.embed_tokens", "model.layers.", "model.norm",
                                                             "lm_head"))}
    config = LlamaConfig(
        vocab_size=llm["model.embed_tokens.weight"].shape[0], hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads, rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta,
        max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(llm, strict=True, assign=True)
    rotary = model.model.rotary_emb  # a non-persistent buffer: rebuilt on the CPU
    model.model.rotary_emb = type(rotary)(config=config)
    return model.eval()


def _stage(report: CheckReport, name: str, reference, ours, note: str = "") -> None:
    ref = np.asarray(reference, np.float64)
    got = np.asarray(ours, np.float64)
    if ref.shape != got.shape:
        raise ConversionError(f"check: {name}: torch gives shape {ref.shape}, jax {got.shape}")
    diff = float(np.max(np.abs(ref - got))) if ref.size else 0.0
    report.stages.append(Stage(name, diff, float(np.max(np.abs(ref))) if ref.size else 0.0, note))


def check_conversion(checkpoint: str | Path, plan: Plan, question: str = DEFAULT_PROMPT) -> CheckReport:
    """Both checks of the module docstring for the converted `checkpoint` made by `plan`."""
    import torch

    from pixellm_jax.convert.checkpoint import model_params
    from pixellm_jax.convert.torch_pixellm import TorchPixelHead
    from pixellm_jax.predictor import Predictor

    report = CheckReport()
    predictor = Predictor.from_checkpoint(checkpoint, ["model.dtype=float32"])
    cfg, model = predictor.loaded.config, predictor.loaded.model
    params = {k: np.asarray(v) for k, v in model_params(model).items()}
    check_stored(params, plan, report)
    state, from_checkpoint = canonical_state(plan, params)

    size = cfg.model.vision.image_size
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    ours = predictor.intermediates(image, question, ANSWER)
    from pixellm_jax.data.transforms import preprocess_image

    prepared = preprocess_image(image, size, cfg.data.normalization)

    def note(prefix: str) -> str:
        taken = [k for k in from_checkpoint if k.startswith(prefix)]
        return f"{len(taken)} tensors initialised by the conversion, taken from the checkpoint" if taken else ""

    clip_features = torch_clip(state, cfg)(prepared.pixels[None])
    for i, (ref, got) in enumerate(zip(clip_features, ours.vision_features)):
        _stage(report, f"CLIP features (level {i})", ref, got, note("vision_model."))
    head = TorchPixelHead.from_state(state, cfg.model)
    tokens = head.image_tokens(clip_features[0])
    _stage(report, "image tokens", tokens, ours.image_tokens, note("model.mm_projector"))
    decoder = head.decoder_features(clip_features)
    for i, (ref, got) in enumerate(zip(decoder, ours.decoder_features)):
        _stage(report, f"decoder features (level {i})", ref, np.transpose(got, (0, 3, 1, 2)),
               note("model.image_feature_neck"))

    llama = torch_llama(state, cfg)
    ids = torch.from_numpy(np.asarray(ours.token_ids, np.int64))
    with torch.no_grad():
        embeds = llama.model.embed_tokens(ids.clamp(min=0))
        embeds[ids < 0] = tokens.reshape(-1, tokens.shape[-1])  # the image tokens at the sentinel
        out = llama(inputs_embeds=embeds, output_hidden_states=True)
    vocab = llama.config.vocab_size
    hidden = out.hidden_states[-1]
    _stage(report, "LLM hidden states", hidden, ours.hidden_states, note("model.layers."))
    _stage(report, "LLM logits", out.logits, ours.logits[..., :vocab])

    seg_ids = cfg.model.head.seg_ids(cfg.model.text.vocab_size)
    prompts = head.seg_embeddings(hidden, ids, seg_ids)[0]
    n = int(ours.num_targets[0])
    if n != prompts.shape[0] or n == 0:
        raise ConversionError(f"check: torch finds {prompts.shape[0]} codebook groups, jax {n}")
    _stage(report, "[SEG] embeddings", prompts, ours.seg_embeddings[0, :n], note("model.text_hidden_fcs"))
    low = head.low_res_masks([d[0] for d in decoder], prompts)
    _stage(report, "low-resolution mask logits", low, ours.low_res_masks[0, :n], note("model.mask_decoder"))
    final = head.final_masks(low, prepared.resized_hw, prepared.original_hw).numpy()
    _stage(report, "final mask logits", final, ours.masks[0, :n])
    report.mask_pixels = int(final.size)
    report.sign_flips = float(np.mean((final > 0) != (ours.masks[0, :n] > 0)))
    return report
