"""Train-step speed: our jitted step vs a PyTorch eager PixelLM, and the MFU against a measured peak.

Both sides do one full training step (forward, loss, backward, global-norm clipping, AdamW) of the
same model on the same batch, with the same trainable set (LoRA on q/v, embed_tokens, lm_head,
both projectors, text_hidden_fcs, the mask decoder) and the same frozen parts (CLIP, LLaMA base
weights, neck, prompt encoder):

  ours      `train.step.make_train_step` (jit, the state donated), fp32;
  PyTorch   transformers `CLIPVisionModel` (no grad) + `LlamaForCausalLM` with a peft LoRA on q/v
            (sdpa attention) + the SAM parts of the pixel decoder from the segment-anything package
            (`tests/sam_reference.py`) with PixelLM's multi-scale glue written here, batched over
            targets; CE, BCE and dice as the official code; `torch.optim.AdamW(foreach=True)`.

The PyTorch model is built first and its weights are copied into ours, so both start from the same
parameters and their first-step losses must agree (printed). Steps of the two are interleaved, so
load from other processes hits both alike; the medians are compared (ratio = PyTorch / ours), with
the spread and the per-step paired ratios beside them. Both run on the same `--threads` CPUs (the
affinity mask sizes XLA's pool, `torch.set_num_threads` PyTorch's; `tools/benchlib.py`), and the load
average before and after is in the JSON line, with a warning when the machine was not idle.

MFU = model FLOPs / step time / peak. Model FLOPs are XLA's cost analysis of the compiled step
(no rematerialisation in this config, so nothing is counted twice); the analytic estimate of
`train.metrics.step_flops` is printed beside it. The peak is the fp32 rate of a large `jnp.dot`
sampled between the steps of this run (median; torch's `mm` rate is printed too). On CPU only the
ratio and the MFU mean anything; absolute times depend on the machine and its load. On a GPU host,
JAX runs on the GPU and `--torch-device cuda` puts the reference (and its `torch.mm` peak) there
too, with TF32 allowed for fp32 matmuls as XLA's default precision does on GPUs.

  python tools/bench_train_step.py                     # 173M params (12x768 LLaMA), 224 px, 2 images x 1 conv x 256 tokens
  python tools/bench_train_step.py --image-size 448 --text-len 448 --images 2 --convs-per-image 2
  python tools/bench_train_step.py --no-torch          # our side only (e.g. on an accelerator)
  python tools/bench_train_step.py --torch-device cuda # on a GPU host: the reference on the same GPU
  python tools/bench_train_step.py --profile /tmp/prof # also: where one step of ours spends its time
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import benchlib  # noqa: E402  (tools/benchlib.py)
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixellm_jax.config import Config, MeshConfig, load_config
from pixellm_jax.mesh import make_mesh
from pixellm_jax.models.trainable import build_pixellm
from pixellm_jax.tokens import IGNORE_INDEX, IMAGE_TOKEN
from pixellm_jax.train.mesh import batch_shardings, global_batch
from pixellm_jax.train.metrics import step_flops
from pixellm_jax.train.optimizer import make_optimizer
from pixellm_jax.train.state import TrainState, split_model, state_layout
from pixellm_jax.train.step import make_train_step


# ------------------------------------------------------------------------------------------------
# Configuration and batch


def bench_config(
    *, hidden: int = 768, layers: int = 12, intermediate: int = 2048, vocab: int = 32009,
    vision_hidden: int = 512, vision_layers: int = 8, image_size: int = 224, max_targets: int = 3,
    remat: str = "none", dtype: str = "float32", base: str = "pixellm_7b", extra: tuple[str, ...] = (),
) -> Config:
    """The official 7B recipe (head, LoRA, losses, trainable set) at benchmark size, fp32, no dropout.

    LoRA dropout is off so that both sides compute the same function (it is elementwise, cheap).
    """
    grid = image_size // 14
    overrides = [
        f"model.text.hidden_size={hidden}", f"model.text.num_layers={layers}",
        f"model.text.intermediate_size={intermediate}", f"model.text.num_heads={hidden // 64}",
        f"model.text.num_kv_heads={hidden // 64}", f"model.text.vocab_size={vocab}", f"model.text.remat={remat}",
        "model.head.seg_token_ids=[]", f"model.head.max_targets={max_targets}",
        f"model.vision.hidden_size={vision_hidden}", f"model.vision.intermediate_size={4 * vision_hidden}",
        f"model.vision.num_layers={vision_layers}", f"model.vision.num_heads={vision_hidden // 64}",
        f"model.vision.image_size={image_size}", f"model.vision.pretrained_image_size={image_size}",
        f"model.vision.feature_layers=[-2,{-(vision_layers // 2 + 1)}]", f"model.projector.llm_grid={grid // 2}",
        "model.lora.dropout=0.0", f"model.dtype={dtype}", f"model.frozen_param_dtype={dtype}",
        "optim.grad_accum_steps=1", "optim.warmup_steps=0",
    ]
    return load_config(base, overrides + list(extra))


def make_batch(cfg: Config, images: int, convs_per_image: int, text_len: int, seed: int = 0) -> dict:
    """A training batch whose every conversation has `head.max_targets` targets, all valid.

    Tokens: BOS, the image sentinel, random text; the answer half is supervised and holds the
    targets' codebook groups. Masks are random rectangles on an image-size canvas (the official
    mask size); images fill the whole square, so no padding is masked anywhere.
    """
    rng = np.random.default_rng(seed)
    mc = cfg.model
    s, k = mc.vision.image_size, mc.head.max_targets
    seg = np.asarray(mc.head.seg_ids(mc.text.vocab_size))
    q = images * convs_per_image
    group = len(seg)
    if text_len < 4 + 2 * k * group:
        raise ValueError(f"--text-len {text_len} is too short for {k} targets of {group} codebook tokens")
    ids = rng.integers(3, min(mc.text.vocab_size, 32000) - group, size=(q, text_len))
    ids[:, 0], ids[:, 1] = 1, IMAGE_TOKEN
    answer = text_len // 2
    step = (text_len - answer - 1) // k
    for t in range(k):
        ids[:, answer + t * step: answer + t * step + group] = seg
    labels = np.where(np.arange(text_len)[None] >= answer, ids, IGNORE_INDEX)
    masks = np.zeros((q, k, s, s), bool)
    for i in range(q):
        for t in range(k):
            y, x = rng.integers(0, s // 2, size=2)
            h, w = rng.integers(s // 8, s // 2, size=2)
            masks[i, t, y: y + h, x: x + w] = True
    return dict(
        pixels=rng.normal(size=(images, s, s, 3)).astype(np.float32),
        resized_hw=np.full((images, 2), s, np.int32), mask_hw=np.full((images, 2), s, np.int32),
        input_ids=ids.astype(np.int32), attention_mask=np.ones((q, text_len), bool),
        labels=labels.astype(np.int32), conv_image=np.repeat(np.arange(images, dtype=np.int32), convs_per_image),
        conv_valid=np.ones(q, bool), masks=masks, mask_valid=np.ones((q, k), bool),
    )


# ------------------------------------------------------------------------------------------------
# Our side


class JaxStep:
    """The compiled train step of `model` on one device, with its state, frozen part and batch."""

    def __init__(self, cfg: Config, model, batch: dict, compiler_options: dict | None = None):
        mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
        tx = make_optimizer(cfg.optim)
        layout = state_layout(cfg, mesh, tx)
        _, params, rngs, frozen = split_model(model, cfg)
        zero = jnp.zeros((), jnp.int32)
        state = TrainState(zero, params, tx.init(params), rngs, zero, zero)
        # The step donates its state: give every leaf its own buffer (the zeros above are shared).
        state = jax.tree.map(lambda x: jnp.array(x, copy=True), state)
        self.state = jax.device_put(state, layout.state_shardings)
        self.frozen = jax.device_put(frozen, layout.frozen_shardings)
        images, convs = batch["pixels"].shape[0], batch["input_ids"].shape[0]
        self.batch = global_batch(batch, batch_shardings(mesh, images, convs))
        step = make_train_step(layout, cfg, tx, mesh, batch_shardings(mesh, images, convs))
        start = time.perf_counter()
        self.compiled = step.lower(self.state, self.frozen, self.batch).compile(compiler_options)
        self.compile_s = time.perf_counter() - start
        cost = self.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        self.flops = float(cost.get("flops", 0.0)) if cost else 0.0

    def __call__(self) -> float:
        """One step; returns the loss of the batch before the update."""
        self.state, metrics = self.compiled(self.state, self.frozen, self.batch)
        return float(jax.block_until_ready(metrics["total"]))


def count_params(model) -> tuple[int, int]:
    """(all, trainable) parameter counts of one of our models (official trainable set)."""
    from pixellm_jax.models.trainable import trainable_filter

    trainable = trainable_filter(model.cfg)
    total = sum(v.get_value().size for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    train = sum(v.get_value().size for _, v in nnx.to_flat_state(nnx.state(model, trainable)))
    return int(total), int(train)


# ------------------------------------------------------------------------------------------------
# PyTorch side


def build_torch_reference(cfg: Config):
    """A PyTorch eager PixelLM of `cfg`, its AdamW optimizer and its step function.

    Returns (model, step) with `step(batch_tensors) -> loss` doing forward, backward, clipping and
    the AdamW update. The model is built on the CPU; `model.to(device)` moves it (the optimizer
    keeps its parameters), and the step runs wherever the batch is.
    """
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from torch import nn
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from tests import sam_reference as sam

    mc = cfg.model
    v, t, h = mc.vision, mc.text, mc.head
    n_states = v.num_layers + 1
    feature_layers = [i % n_states for i in v.feature_layers]

    class Projector(nn.Module):
        def __init__(self, d_in, d_hidden, d_out):
            super().__init__()
            self.linear_1, self.linear_2 = nn.Linear(d_in, d_hidden), nn.Linear(d_hidden, d_out)

        def forward(self, x):
            return self.linear_2(F.gelu(self.linear_1(x)))

    class TextHiddenFcs(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(t.hidden_size, t.hidden_size), nn.Linear(t.hidden_size, h.out_dim)

        def forward(self, x):
            return self.fc2(F.relu(self.fc1(x)))

    class PromptEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.pe_layer = sam.PositionEmbeddingRandom(h.out_dim // 2)
            self.no_mask_embed = nn.Embedding(1, h.out_dim)

    def upscaling(c_in, c_out):
        return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 2, 2), sam.LayerNorm2d(c_out), nn.GELU())

    class MaskDecoder(nn.Module):
        """PixelLM's `MaskDecoderMultiScale`, batched over targets (one gather of image features)."""

        def __init__(self):
            super().__init__()
            dim = h.out_dim
            self.transformer = nn.ModuleList(
                sam.TwoWayTransformer(depth=h.decoder_depth, embedding_dim=dim, num_heads=h.decoder_heads,
                                      mlp_dim=h.decoder_mlp_dim, attention_downsample_rate=h.attention_downsample)
                for _ in range(h.scale_num))
            self.iou_token = nn.Embedding(1, dim)
            self.mask_tokens = nn.Embedding(h.num_mask_tokens, dim)
            self.level_embed = nn.Embedding(h.scale_num, dim)
            self.output_upscaling = upscaling(dim, dim // 8)
            if h.scale_num > 1:
                self.upsample_2x = upscaling(dim, dim)
                self.pe1 = sam.PositionEmbeddingRandom(dim // 2)
            self.output_hypernetworks_mlps = nn.ModuleList(sam.MLP(dim, dim, dim // 8, 3)
                                                           for _ in range(h.num_mask_tokens))
            self.iou_prediction_head = sam.MLP(dim, dim, h.num_mask_tokens, 3)

        def forward(self, features, prompts, image_index, prompt_encoder):
            n = prompts.shape[0]
            out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], 0)
            dense = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
            level_masks = []
            for level in range(h.scale_num):
                tokens = torch.cat([out_tokens.expand(n, -1, -1), prompts[:, level: level + 1]], 1)
                tokens = tokens + self.level_embed.weight[level]
                feats = features[level]
                for _ in range(level):
                    feats = self.upsample_2x(feats)
                src = feats[image_index]
                _, c, hh, ww = src.shape
                if level == 0:
                    pe = prompt_encoder.pe_layer((hh, ww))
                else:
                    src = src * (torch.sigmoid(level_masks[-1])[:, None] + 1)
                    pe = self.pe1((hh, ww))
                hs, keys = self.transformer[level](src + dense, pe[None], tokens)
                upscaled = self.output_upscaling(keys.transpose(1, 2).reshape(n, c, hh, ww))
                hyper = self.output_hypernetworks_mlps[0](hs[:, 1])
                level_masks.append(torch.einsum("nc,nchw->nhw", hyper, upscaled))
            size = level_masks[-1].shape[1:]
            logits = 0
            for m in level_masks:
                if m.shape[1:] != size:
                    m = F.interpolate(m[:, None], size, mode="bilinear", align_corners=False)[:, 0]
                logits = logits + m / h.scale_num
            return logits

    class TorchPixelLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_tower = CLIPVisionModel(CLIPVisionConfig(
                hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
                num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
                layer_norm_eps=v.layer_norm_eps, hidden_act="quick_gelu"))
            hidden = mc.projector.hidden_mult * t.hidden_size
            self.mm_projector = Projector(v.hidden_size, hidden, t.hidden_size)
            self.out_mm_projector = Projector(v.hidden_size, hidden, t.hidden_size)
            llama = LlamaForCausalLM(LlamaConfig(
                vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta,
                max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=False))
            peft = get_peft_model(llama, LoraConfig(r=mc.lora.rank, lora_alpha=mc.lora.alpha, lora_dropout=0.0,
                                                    target_modules=list(mc.lora.targets)))
            self.llm = peft.base_model.model  # the LlamaForCausalLM with adapters injected
            self.text_hidden_fcs = TextHiddenFcs()
            self.image_feature_neck = nn.Sequential(
                nn.Conv2d(t.hidden_size, h.out_dim, 1, bias=False), sam.LayerNorm2d(h.out_dim),
                nn.Conv2d(h.out_dim, h.out_dim, 3, padding=1, bias=False), sam.LayerNorm2d(h.out_dim))
            self.prompt_encoder = PromptEncoder()
            self.mask_decoder = MaskDecoder()
            self.register_buffer("seg_ids", torch.tensor(mc.head.seg_ids(t.vocab_size)), persistent=False)

        def trainable(self) -> list:
            names = ("mm_projector.", "out_mm_projector.", "text_hidden_fcs.", "mask_decoder.",
                     "llm.model.embed_tokens.", "llm.lm_head.")
            return [p for n, p in self.named_parameters() if n.startswith(names) or ".lora_" in n]

        def forward(self, b) -> torch.Tensor:
            n_img, s = b["pixels"].shape[:2]
            grid = v.grid
            with torch.no_grad():  # the tower is frozen
                states = self.vision_tower(pixel_values=b["pixels"].permute(0, 3, 1, 2),
                                           output_hidden_states=True).hidden_states
            feats = [states[i][:, 1:] for i in feature_layers]
            deep = feats[0].transpose(1, 2).reshape(n_img, -1, grid, grid)
            pooled = F.avg_pool2d(deep, grid // mc.projector.llm_grid).flatten(2).transpose(1, 2)
            image_tokens = self.mm_projector(pooled)
            decoder_feats = [
                self.image_feature_neck(self.out_mm_projector(f).transpose(1, 2).reshape(n_img, -1, grid, grid))
                for f in feats[: h.scale_num]]

            # LLaVA's splice: each conversation's sentinel replaced by its image's tokens.
            ids, labels = b["input_ids"], b["labels"]
            text = self.llm.model.embed_tokens(ids.clamp(min=0))
            embeds, new_labels, new_ids = [], [], []
            for i in range(ids.shape[0]):
                p = int((ids[i] == IMAGE_TOKEN).nonzero()[0])
                img = image_tokens[b["conv_image"][i]]
                embeds.append(torch.cat([text[i, :p], img, text[i, p + 1:]]))
                ignore = torch.full((img.shape[0],), IGNORE_INDEX, dtype=labels.dtype, device=ids.device)
                sentinel = torch.full((img.shape[0],), IMAGE_TOKEN, dtype=ids.dtype, device=ids.device)
                new_labels.append(torch.cat([labels[i, :p], ignore, labels[i, p + 1:]]))
                new_ids.append(torch.cat([ids[i, :p], sentinel, ids[i, p + 1:]]))
            embeds, labels, ids = torch.stack(embeds), torch.stack(new_labels), torch.stack(new_ids)
            hidden = self.llm.model(inputs_embeds=embeds,
                                    attention_mask=torch.ones_like(ids)).last_hidden_state
            logits = self.llm.lm_head(hidden)
            ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)

            # The state predicting each codebook token, grouped per target (N per level, L levels).
            predicts = torch.isin(ids[:, 1:], self.seg_ids)
            states = hidden[:, :-1][predicts].reshape(-1, h.scale_num, h.seg_token_num, t.hidden_size)
            e = self.text_hidden_fcs(states)
            scale = 1.0 / (h.seg_token_num * h.scale_num)
            prompts = e[:, :, 0] * 0
            for j in range(h.seg_token_num):  # the official fixed fusion, in its order
                prompts = prompts + scale * e[:, :, j]
            per_conv = predicts.sum(1) // (h.seg_token_num * h.scale_num)
            image_index = torch.repeat_interleave(b["conv_image"], per_conv)
            masks = self.mask_decoder(decoder_feats, prompts, image_index, self.prompt_encoder)
            masks = F.interpolate(masks[:, None], (s, s), mode="bilinear", align_corners=False)[:, 0]

            target = b["masks"][b["mask_valid"]].float()  # conversation-major, as the decoded targets
            bce = F.binary_cross_entropy_with_logits(masks, target, reduction="none").mean((1, 2)).mean()
            p = torch.sigmoid(masks) / 1000.0
            dice = 1 - (2 * (p * target).sum((1, 2)) + 1e-6) / (p.sum((1, 2)) + (target / 1000.0).sum((1, 2)) + 1e-6)
            lw = cfg.loss
            return lw.ce_weight * ce + lw.bce_weight * bce + lw.dice_weight * dice.mean()

    model = TorchPixelLM()
    for p in model.parameters():
        p.requires_grad_(False)
    params = model.trainable()
    for p in params:
        p.requires_grad_(True)
    o = cfg.optim
    opt = torch.optim.AdamW(params, lr=o.learning_rate, betas=(o.b1, o.b2), eps=1e-8,
                            weight_decay=o.weight_decay, foreach=True)

    def step(batch) -> float:
        opt.zero_grad(set_to_none=True)
        loss = model(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, o.grad_clip, foreach=True)
        opt.step()
        return float(loss.detach())

    return model, step


def torch_inputs(batch: dict, device: str = "cpu") -> dict:
    """The batch as torch tensors on `device` (token ids and labels int64, as torch indexing wants)."""
    import torch

    out = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    for k in ("input_ids", "labels", "conv_image"):
        out[k] = out[k].long()
    return {k: v.to(device) for k, v in out.items()}


def _torch_value(sd: dict, key: str, kind: str) -> np.ndarray:
    """The array of torch `key` (a module path) for one of our variable kinds (kernel, scale, ...)."""
    if kind == "kernel":
        w = sd[key + ".weight"]
        return w.T if w.ndim == 2 else w.transpose(2, 3, 1, 0)  # Linear -> [in, out]; Conv OIHW -> HWIO
    if kind in ("scale", "embedding"):
        return sd[key + ".weight"]
    return sd[f"{key}.{kind}"] if f"{key}.{kind}" in sd else sd[f"{key}.{kind}.weight"]


def _llm_value(sd: dict, path: tuple[str, ...], layers: int) -> np.ndarray:
    """Our LLM variable at `path` (below `llm/`) from the peft-injected LlamaForCausalLM state dict."""
    if path[0] == "layers":
        module, kind = ".".join(path[1:-1]), path[-1]

        def one(i):
            key = f"model.layers.{i}.{module}"
            if kind == "kernel":
                return sd.get(f"{key}.base_layer.weight", sd.get(f"{key}.weight")).T
            if kind in ("lora_a", "lora_b"):
                return sd[f"{key}.lora_{kind[-1].upper()}.default.weight"].T
            return sd[f"{key}.{kind}"]

        return np.stack([one(i) for i in range(layers)])
    prefix = "lm_head" if path[0] == "lm_head" else "model." + ".".join(path[:-1])
    return _torch_value(sd, prefix, path[-1])


def copy_torch_into(torch_model, model) -> None:
    """Give our `model` the weights of the PyTorch reference; every variable is set exactly once.

    `model` may be abstract (`nnx.eval_shape`): afterwards every variable holds a concrete array.
    """
    from tests import sam_reference as sam

    for name in ("image_feature_neck", "prompt_encoder", "mask_decoder", "mm_projector", "out_mm_projector",
                 "text_hidden_fcs"):
        sam.copy_into(getattr(torch_model, name), getattr(model, name))
    vision = {k.removeprefix("vision_model."): x.numpy() for k, x in torch_model.vision_tower.state_dict().items()}
    llm = {k: x.numpy() for k, x in torch_model.llm.state_dict().items()}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        path = tuple(str(p) for p in path)
        if path[0] == "vision_tower":
            value = _torch_value(vision, ".".join(path[1:-1]), path[-1])
        elif path[0] == "llm":
            value = _llm_value(llm, path[1:], model.cfg.text.num_layers)
        else:
            continue  # copied above, module by module
        current = var.get_value()
        if current.shape != value.shape:
            raise ValueError(f"{'/'.join(path)}: ours {current.shape}, torch {value.shape}")
        var.set_value(jnp.asarray(np.ascontiguousarray(value), current.dtype))
    abstract = [p for p, v in nnx.to_flat_state(nnx.state(model)) if not isinstance(v.get_value(), jax.Array)]
    if abstract:
        raise AssertionError(f"variables not copied from the PyTorch reference: {abstract}")


# ------------------------------------------------------------------------------------------------
# Peak and timing


class MatmulPeak:
    """fp32 FLOP/s of an n x n x n `jnp.dot` (and `torch.mm`), sampled between the steps.

    Each sample runs the product `repeats` times back to back; the rate is total FLOPs over total
    time, so a sample sees the machine's load the way a step does.
    """

    def __init__(self, n: int = 2048, repeats: int = 4, with_torch: bool = True, torch_device: str = "cpu"):
        self.n, self.repeats = n, repeats
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        dot = jax.jit(jnp.dot)
        dot(a, a).block_until_ready()
        self._jax = lambda: dot(a, a).block_until_ready()
        self._torch = None
        if with_torch:
            import torch

            x = torch.randn(n, n, device=torch_device)
            sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
            torch.mm(x, x)
            self._torch = lambda: (torch.mm(x, x), sync())
        self.jax_rates: list[float] = []
        self.torch_rates: list[float] = []

    def _rate(self, fn) -> float:
        return self.repeats * 2 * self.n**3 / _timed(lambda: [fn() for _ in range(self.repeats)])

    def sample(self) -> None:
        self.jax_rates.append(self._rate(self._jax))
        if self._torch is not None:
            self.torch_rates.append(self._rate(self._torch))


def op_times(fn, logdir: str) -> list[tuple[str, float, int]]:
    """Run `fn` under `jax.profiler` and sum the traced XLA op times by op kind, largest first.

    Returns (op kind, seconds, count) with the kind the HLO name without its numeric suffix
    (`convolution-base-dilated.2` -> `convolution-base-dilated`). The seconds add up over the
    executor's threads, so they can exceed the wall time; compare them with each other.
    """
    import glob
    import gzip
    import re
    from collections import Counter

    with jax.profiler.trace(logdir):
        fn()
    (path,) = sorted(glob.glob(f"{logdir}/**/*.trace.json.gz", recursive=True))[-1:]
    seconds, counts = Counter(), Counter()
    for event in json.load(gzip.open(path))["traceEvents"]:
        name = event.get("name", "")
        if event.get("ph") != "X" or name.startswith(("$", "ThunkExecutor", "SlinkyThreadPool")):
            continue  # Python frames and the executor's own spans wrap the ops
        kind = re.sub(r"\.\d+$", "", name)
        seconds[kind] += event["dur"] / 1e6
        counts[kind] += 1
    return [(k, v, counts[k]) for k, v in seconds.most_common()]


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_jax_side(cfg: Config, batch: dict, steps: int = 2, model=None, compiler_options: dict | None = None) -> dict:
    """Compile and run our step alone (no torch): compile time, FLOPs, per-step times, losses.

    `compiler_options` go to XLA (tests pass LLVM -O0 to compile faster; the numerics are the same).
    """
    model = model if model is not None else build_pixellm(cfg.model, cfg.seed)
    total, trainable = count_params(model)
    runner = JaxStep(cfg, model, batch, compiler_options)
    losses, times = [], []
    for _ in range(steps):
        start = time.perf_counter()
        losses.append(runner())
        times.append(time.perf_counter() - start)
    return dict(params=total, trainable=trainable, compile_s=runner.compile_s, flops=runner.flops,
                times=times, losses=losses)


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768, help="LLaMA hidden size (heads = hidden / 64)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32009)
    parser.add_argument("--vision-hidden", type=int, default=512)
    parser.add_argument("--vision-layers", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--convs-per-image", type=int, default=1)
    parser.add_argument("--text-len", type=int, default=256, help="text tokens per conversation (before the image)")
    parser.add_argument("--targets", type=int, default=3, help="masks per conversation")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side (after one warm-up step)")
    parser.add_argument("--peak-size", type=int, default=2048, help="side of the matmul timed for the peak")
    parser.add_argument("--no-torch", action="store_true", help="time our step only")
    parser.add_argument("--torch-device", default="cpu", help="where the PyTorch reference runs (cpu, cuda)")
    parser.add_argument("--profile", metavar="DIR", help="trace one more step of ours into DIR; print time by op kind")
    parser.add_argument("--threads", type=int, default=None, help="CPUs (and threads) for both sides (default: all)")
    args = parser.parse_args(argv)
    pinned = benchlib.pin_threads(args.threads)  # before the first JAX computation
    load = benchlib.LoadRecord()
    load.warn()

    cfg = bench_config(hidden=args.hidden, layers=args.layers, intermediate=args.intermediate, vocab=args.vocab,
                       vision_hidden=args.vision_hidden, vision_layers=args.vision_layers,
                       image_size=args.image_size, max_targets=args.targets)
    batch = make_batch(cfg, args.images, args.convs_per_image, args.text_len)
    cores = pinned["threads"]
    torch_threads = None
    if args.no_torch:
        model = build_pixellm(cfg.model, cfg.seed)
    else:
        import torch

        torch.manual_seed(0)
        torch.set_num_threads(cores)
        torch_threads = torch.get_num_threads()
        # fp32 matmuls as XLA's default precision runs them: TF32 on GPUs, full fp32 on CPUs
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch_model, torch_step = build_torch_reference(cfg)
        model = nnx.eval_shape(lambda: build_pixellm(cfg.model, cfg.seed))  # filled from the reference
        copy_torch_into(torch_model, model)
        torch_model.to(args.torch_device)
        torch_batch = torch_inputs(batch, args.torch_device)
        n_torch = sum(p.numel() for n, p in torch_model.named_parameters() if "post_layernorm" not in n)
    total, trainable = count_params(model)
    runner = JaxStep(cfg, model, batch)

    peaks = MatmulPeak(args.peak_size, with_torch=not args.no_torch, torch_device=args.torch_device)
    jax_times, torch_times, jax_losses, torch_losses = [], [], [], []
    for i in range(args.steps + 1):  # step 0 is the warm-up (and the loss comparison)
        start = time.perf_counter()
        jax_losses.append(runner())
        jax_times.append(time.perf_counter() - start)
        if not args.no_torch:
            start = time.perf_counter()
            torch_losses.append(torch_step(torch_batch))
            torch_times.append(time.perf_counter() - start)
        if i:
            peaks.sample()
    load.finish()
    profile = op_times(runner, args.profile) if args.profile else None
    peak = statistics.median(peaks.jax_rates)
    torch_peak = statistics.median(peaks.torch_rates) if peaks.torch_rates else None

    jax_s = statistics.median(jax_times[1:])
    torch_s = statistics.median(torch_times[1:]) if torch_times else None
    images, convs = args.images, args.images * args.convs_per_image
    analytic = step_flops(cfg, images, convs, args.text_len)
    mfu = runner.flops / jax_s / peak
    seq = args.text_len + cfg.model.projector.llm_grid ** 2 - 1

    print(f"train step, fp32, JAX on {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}, "
          f"{cores} cores), PyTorch on {'-' if args.no_torch else args.torch_device} ({torch_threads} CPU threads)")
    print(f"model: LLaMA {args.layers}x{args.hidden} (vocab {args.vocab}), CLIP {args.vision_layers}x"
          f"{args.vision_hidden} at {args.image_size}px; {total / 1e6:.1f}M params, {trainable / 1e6:.1f}M trainable"
          + ("" if args.no_torch else f" (PyTorch: {n_torch / 1e6:.1f}M)"))
    print(f"batch: {images} images, {convs} conversations x {seq} tokens ({args.text_len} text + "
          f"{cfg.model.projector.llm_grid ** 2} image - 1), {args.targets} masks each at {args.image_size}px")
    print(f"compile (ours): {runner.compile_s:.1f}s; model FLOPs/step: XLA {runner.flops / 1e9:.1f} G, "
          f"analytic (step_flops) {analytic / 1e9:.1f} G")
    print(f"matmul peak (fp32, {args.peak_size}^3, median of samples taken between the steps): "
          f"jnp.dot {peak / 1e9:.1f} GFLOP/s" + ("" if torch_peak is None else f", torch.mm {torch_peak / 1e9:.1f} GFLOP/s"))
    print(f"{'':<26}{'step s (median)':>16}{'min':>8}{'loss@0':>12}{'GFLOP/s':>10}{'MFU':>7}")
    print(f"{'ours (jit)':<26}{jax_s:>16.3f}{min(jax_times[1:]):>8.3f}{jax_losses[0]:>12.6f}"
          f"{runner.flops / jax_s / 1e9:>10.1f}{mfu:>7.1%}")
    if torch_s is not None:
        print(f"{'PyTorch eager':<26}{torch_s:>16.3f}{min(torch_times[1:]):>8.3f}{torch_losses[0]:>12.6f}"
              f"{runner.flops / torch_s / 1e9:>10.1f}{runner.flops / torch_s / peak:>7.1%}")
        paired = benchlib.ratio(torch_times[1:], jax_times[1:])
        print(f"speed-up (PyTorch / ours): {torch_s / jax_s:.2f}x (target >= 1.5x; paired steps "
              f"{paired['paired_min']:.2f}-{paired['paired_max']:.2f}x); "
              f"|loss difference| at step 0: {abs(jax_losses[0] - torch_losses[0]):.2e}")
    print(f"MFU (ours): {mfu:.1%} of the measured jnp.dot peak (target >= 60%)"
          + ("" if torch_peak is None else f"; {runner.flops / jax_s / max(peak, torch_peak):.1%} of the faster of "
             "jnp.dot and torch.mm"))
    if profile:
        op_total = sum(t for _, t, _ in profile)
        print("time by XLA op kind, one step of ours (seconds summed over the executor's threads):")
        for kind, t, n in profile[:8]:
            print(f"  {kind:<32}{t:>9.2f}s {t / op_total:>6.1%} {n:>6} ops")
    print(json.dumps({
        "bench": "train_step",
        "device": jax.devices()[0].device_kind,
        "cores": cores,
        "threads": {"xla": cores, "torch": torch_threads},
        "torch_device": None if args.no_torch else args.torch_device,
        "config": {k: getattr(args, k) for k in ("hidden", "layers", "intermediate", "vocab", "vision_hidden",
                                                 "vision_layers", "image_size", "images", "convs_per_image",
                                                 "text_len", "targets")},
        "params": total, "trainable": trainable,
        "compile_s": runner.compile_s,
        "jax_step_s": jax_s, "jax_step_times": jax_times[1:],
        "torch_step_s": torch_s, "torch_step_times": torch_times[1:],
        "ratio": None if torch_s is None else torch_s / jax_s,
        "jax_seconds": benchlib.summary(jax_times[1:]),
        "torch_seconds": benchlib.summary(torch_times[1:]) if torch_s is not None else None,
        "paired_ratio": benchlib.ratio(torch_times[1:], jax_times[1:]) if torch_s is not None else None,
        "pinned": pinned, **load.as_dict(),
        "loss_step0": {"jax": jax_losses[0], "torch": torch_losses[0] if torch_losses else None},
        "model_flops": runner.flops, "analytic_flops": analytic,
        "peak_flops": peak, "peak_samples": peaks.jax_rates, "torch_peak_flops": torch_peak,
        "mfu": mfu,
        "mfu_vs_best_matmul": runner.flops / jax_s / max(peak, torch_peak or 0.0),
        "targets": {"ratio": 1.5, "mfu": 0.6},
        "profile": profile[:12] if profile else None,
    }))
    print(f"load average {load.before:.2f} before, {load.after:.2f} after")
    load.warn()


if __name__ == "__main__":
    main()
