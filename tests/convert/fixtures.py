"""Tiny real-format PyTorch checkpoints for the converter tests, built offline with torch/transformers.

* `write_pixellm_release`: an official-layout PixelLM `hf_model/`: the state dict of a module tree
  with the official names (transformers `LlamaModel` + PixelLM's modules, with transformers-4.31
  style `rotary_emb.inv_freq` buffers), LLM and projectors in bf16 and the pixel modules in fp32,
  `torch.save`d into two shards with a `pytorch_model.bin.index.json`, plus the 4.31 tokenizer files.
* `write_clip`: a full `CLIPModel` (text tower included), hub layout (`vision_model.` prefix).
* `write_llava_hf`: `LlavaForConditionalGeneration` in hub layout, either vision prefix.
* `write_llava`: original LLaVA (`LlavaLlamaForCausalLM` names), v1 linear or v1.5 mlp2x_gelu projector.

Dimensions follow configs/tiny.yaml, so `--config tiny` is the matching base.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from tests import sam_reference as sam
from tests.tiny_tokenizer import build_tiny_tokenizer

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=256)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              patch_size=14, image_size=42, hidden_act="quick_gelu", layer_norm_eps=1e-5)
OUT_DIM, IMAGE_SIZE, GRID = 32, 56, 4
PIECES = 420  # SentencePiece vocabulary of tests/tiny_tokenizer.py
RELEASE_ADDED = {"<im_patch>": 420, "<im_start>": 421, "<im_end>": 422,
                 **{f"[SEG{i}]": 423 + i for i in range(6)}}
RELEASE_VOCAB = 429
BF16_PREFIXES = ("model.embed_tokens", "model.layers", "model.norm", "lm_head", "model.mm_projector",
                 "model.out_mm_projector")


def redraw_(module: nn.Module, seed: int) -> nn.Module:
    """Weights larger than the defaults (norm weights 1 +- 0.1, embeddings std 0.5, others 0.08)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            is_norm = any(s in name for s in ("norm", "layrnorm", "image_feature_neck.1", "image_feature_neck.3",
                                              "upscaling.1", "upsample_2x.1", "mask_downscaling.1",
                                              "mask_downscaling.4"))
            if is_norm and leaf == "weight":
                p.copy_(1 + 0.2 * (torch.rand(p.shape, generator=g) - 0.5))
            elif leaf == "bias":
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif "embed" in name or "token" in name or "class_embedding" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
    return module


def llama_config(vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, rope_theta=10000.0, tie_word_embeddings=False, **TEXT)


def tiny_llama(vocab: int, seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = llama_config(vocab)
    cfg._attn_implementation = "eager"
    return redraw_(LlamaForCausalLM(cfg).eval(), seed)


class _Rotary(nn.Module):
    """transformers-4.31 `LlamaRotaryEmbedding`: a persistent `inv_freq` buffer in every layer."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim)))


class _MaskDecoderMultiScale(nn.Module):
    """The parameter structure of the official `MaskDecoderMultiScale` (names only; no forward)."""

    def __init__(self, dim: int = OUT_DIM, levels: int = 2, tokens: int = 4):
        super().__init__()
        self.transformer = nn.ModuleList(
            sam.TwoWayTransformer(depth=2, embedding_dim=dim, num_heads=4, mlp_dim=64) for _ in range(levels)
        )
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(tokens, dim)

        def upscaling(cout):
            return nn.Sequential(nn.ConvTranspose2d(dim, cout, 2, 2), sam.LayerNorm2d(cout), nn.GELU())

        self.output_upscaling = upscaling(dim // 8)
        self.upsample_2x = upscaling(dim)
        self.pe1 = sam.PositionEmbeddingRandom(dim // 2)
        self.output_hypernetworks_mlps = nn.ModuleList(sam.MLP(dim, dim, dim // 8, 3) for _ in range(tokens))
        self.iou_prediction_head = sam.MLP(dim, dim, tokens, 3)
        self.level_embed = nn.Embedding(levels, dim)


class OfficialPixelLM(nn.Module):
    """A module tree whose `state_dict()` names are those of the official `PixelLMForCausalLM`."""

    def __init__(self, vocab: int = RELEASE_VOCAB, seed: int = 0):
        super().__init__()
        llama = tiny_llama(vocab, seed)
        h, v = TEXT["hidden_size"], VISION["hidden_size"]
        self.model, self.lm_head = llama.model, llama.lm_head
        for layer in self.model.layers:
            layer.self_attn.rotary_emb = _Rotary(h // TEXT["num_attention_heads"])
        torch.manual_seed(seed + 1)

        def projector():
            return nn.Sequential(nn.Linear(v, 2 * h), nn.GELU(), nn.Linear(2 * h, h))

        self.model.mm_projector = projector()
        self.model.out_mm_projector = projector()
        self.model.prompt_encoder = sam._prompt_encoder.PromptEncoder(
            embed_dim=OUT_DIM, image_embedding_size=(GRID, GRID), input_image_size=(IMAGE_SIZE, IMAGE_SIZE),
            mask_in_chans=16,
        )
        self.model.mask_decoder = _MaskDecoderMultiScale()
        self.model.image_feature_neck = nn.Sequential(
            nn.Conv2d(h, OUT_DIM, 1, bias=False), sam.LayerNorm2d(OUT_DIM),
            nn.Conv2d(OUT_DIM, OUT_DIM, 3, padding=1, bias=False), sam.LayerNorm2d(OUT_DIM),
        )
        self.model.text_hidden_fcs = nn.ModuleList(
            [nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, OUT_DIM), nn.Dropout(0.0))]
        )
        head = nn.ModuleList([self.model.mm_projector, self.model.out_mm_projector, self.model.prompt_encoder,
                              self.model.mask_decoder, self.model.image_feature_neck, self.model.text_hidden_fcs])
        redraw_(head, seed + 2)

    def release_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict as the release stores it: LLM and projectors bf16, pixel modules fp32."""
        out = {}
        for k, t in self.state_dict().items():
            bf16 = k.startswith(BF16_PREFIXES) and not k.endswith("inv_freq")
            out[k] = t.detach().to(torch.bfloat16 if bf16 else torch.float32).clone()
        return out


def write_release_tokenizer(directory: Path) -> None:
    build_tiny_tokenizer(directory)
    (directory / "added_tokens.json").write_text(json.dumps(RELEASE_ADDED, indent=2, sort_keys=True))
    (directory / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}))


def save_sharded_bin(directory: Path, state: dict[str, torch.Tensor], shards: int = 2) -> list[str]:
    """`torch.save` shards `pytorch_model-0000k-of-0000n.bin` and the index, as transformers 4.31 did."""
    keys = list(state)
    per = -(-len(keys) // shards)
    weight_map, names = {}, []
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in keys[i * per: (i + 1) * per]}
        torch.save(part, directory / name)
        weight_map.update({k: name for k in part})
        names.append(name)
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


def release_config(vocab: int = RELEASE_VOCAB) -> dict:
    """An official-style `hf_model/config.json` (fields of the released 7B config, tiny sizes)."""
    return {
        "_name_or_path": "./ckpt/Llava-7B-V1-1/", "architectures": ["PixelLMForCausalLM"], "model_type": "llava",
        **TEXT, "hidden_act": "silu", "rope_scaling": None, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.31.0", "use_cache": False, "vocab_size": vocab,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "mm_hidden_size": VISION["hidden_size"], "mm_projector_hidden_dim": 2, "mm_projector_out_dim": 1,
        "mm_use_im_start_end": True, "mm_use_im_patch_token": False, "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2, "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "image_feature_scale_num": 2, "out_dim": OUT_DIM, "pad_train_clip_images": True,
        "resize_vision_tower": True, "resize_vision_tower_size": IMAGE_SIZE, "separate_mm_projector": True,
        "vision_tower_for_mask": True, "image_aspect_ratio": "square",
    }


def write_pixellm_release(directory: Path, seed: int = 0) -> tuple[Path, OfficialPixelLM, dict]:
    """`<directory>/hf_model/` in the official layout; returns (hf_model dir, module, written state dict)."""
    hf_model = directory / "hf_model"
    hf_model.mkdir(parents=True)
    module = OfficialPixelLM(seed=seed)
    state = module.release_state_dict()
    save_sharded_bin(hf_model, state)
    (hf_model / "config.json").write_text(json.dumps(release_config(), indent=2))
    (hf_model / "generation_config.json").write_text(json.dumps(
        {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}))
    write_release_tokenizer(hf_model)
    return hf_model, module, state


def _vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**VISION)


def write_clip(directory: Path, seed: int = 3) -> Path:
    """A full tiny `CLIPModel` saved with `save_pretrained`, keys rewritten to the hub's `vision_model.`."""
    from safetensors.torch import load_file, save_file
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig

    text = CLIPTextConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                          vocab_size=64, max_position_embeddings=16, projection_dim=16,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = CLIPConfig(text_config=text.to_dict(), vision_config=_vision_config().to_dict(), projection_dim=16)
    torch.manual_seed(seed)
    model = redraw_(CLIPModel(cfg).eval(), seed)
    model.save_pretrained(directory)
    path = directory / "model.safetensors"
    state = load_file(str(path))
    hub = {k if k.startswith(("vision_model.", "text_model.", "visual_projection", "text_projection", "logit_scale"))
           else f"vision_model.{k}": v for k, v in state.items()}
    save_file(hub, str(path), metadata={"format": "pt"})
    return directory


def llava_tokenizer(directory: Path):
    """The tiny tokenizer with llava-hf's `<image>` and `<pad>` added (ids 420, 421)."""
    from transformers import AddedToken, AutoTokenizer

    build_tiny_tokenizer(directory)
    tok = AutoTokenizer.from_pretrained(str(directory))
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.save_pretrained(str(directory))
    return tok


LLAVA_HF_VOCAB = 448  # 422 tokens padded to a multiple of 64, as llava-hf pads 32002 to 32064


def tiny_llava_hf(seed: int = 5):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(vision_config=_vision_config().to_dict(), text_config=llama_config(LLAVA_HF_VOCAB).to_dict(),
                      image_token_index=PIECES, projector_hidden_act="gelu", vision_feature_layer=-2,
                      vision_feature_select_strategy="default", image_seq_length=(42 // 14) ** 2)
    torch.manual_seed(seed)
    return redraw_(LlavaForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval(), seed)


def write_llava_hf(directory: Path, vision_prefix: str = "vision_tower.vision_model.", seed: int = 5):
    """llava-hf files in the hub layout, with the vision tower under `vision_prefix`."""
    from safetensors.torch import load_file, save_file

    model = tiny_llava_hf(seed)
    model.save_pretrained(directory)
    llava_tokenizer(directory)
    files = sorted(directory.glob("*.safetensors"))
    for path in files:
        state = load_file(str(path))
        state = {(vision_prefix + k[len("vision_tower."):]).replace("vision_model.vision_model.", "vision_model.")
                 if k.startswith("vision_tower.") else k: v for k, v in state.items()}
        save_file(state, str(path), metadata={"format": "pt"})
    return directory, model


def write_llava(directory: Path, projector: str, vocab: int = PIECES, seed: int = 7) -> tuple[Path, dict]:
    """Original LLaVA names (v1 `linear` or v1.5 `mlp2x_gelu` projector), `.bin` shards + index, no CLIP."""
    llama = tiny_llama(vocab, seed)
    state = {k: v.detach().clone().half() for k, v in llama.state_dict().items()}
    for i in range(TEXT["num_hidden_layers"]):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = _Rotary(16).inv_freq
    h, v = TEXT["hidden_size"], VISION["hidden_size"]
    g = torch.Generator().manual_seed(seed)
    if projector == "linear":
        state["model.mm_projector.weight"] = 0.08 * torch.randn(h, v, generator=g)
        state["model.mm_projector.bias"] = 0.05 * torch.randn(h, generator=g)
    else:
        for i, (o, n) in ((0, (h, v)), (2, (h, h))):
            state[f"model.mm_projector.{i}.weight"] = 0.08 * torch.randn(o, n, generator=g)
            state[f"model.mm_projector.{i}.bias"] = 0.05 * torch.randn(o, generator=g)
    directory.mkdir(parents=True, exist_ok=True)
    save_sharded_bin(directory, state)
    cfg = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", **TEXT, "vocab_size": vocab,
           "mm_hidden_size": v, "mm_projector_type": projector, "mm_vision_select_layer": -2,
           "mm_vision_tower": "openai/clip-vit-large-patch14", "mm_use_im_start_end": False}
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    build_tiny_tokenizer(directory)
    return directory, state


def to_numpy(t: torch.Tensor):
    """A tensor's values in its own dtype (bfloat16 through ml_dtypes)."""
    import ml_dtypes

    t = t.detach()
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()
