"""The PixelLM pixel head in PyTorch, with the official code's semantics, in float32.

Everything of PixelLM that is neither CLIP nor LLaMA: the two vision projectors, `text_hidden_fcs`
with the fixed token fusion, the image feature neck, the used parts of SAM's prompt encoder, and
`MaskDecoderMultiScale` with the scale combination and mask post-processing (reference PIXELLM.md
§1.3-§1.8, §2.5-§2.6). It is built from the *source* tensors under their official release names
(`model.mm_projector.*`, `model.mask_decoder.*`, ...), so a converted checkpoint can be checked
stage by stage against PyTorch without the official package or segment-anything. Needs the
`[torch]` extra; nothing else in the package imports this module at import time.

Each stage takes what the matching JAX code takes, so both can be fed identical inputs:

* `image_tokens`: deep CLIP patches -> bilinear resize to the LLM token grid (2x2 average) ->
  `mm_projector`, as `PixelLM.encode_images(...).llm_tokens`;
* `decoder_features`: every level's CLIP patches -> `out_mm_projector` (or `mm_projector` when not
  separate) -> neck, as `encode_images(...).decoder` (here NCHW);
* `seg_embeddings`: final LLaMA states -> `text_hidden_fcs` -> the states predicting the codebook
  tokens -> fixed fusion, as `PixelLM.seg_embeddings`;
* `low_res_masks`: one image's neck features and its targets' prompts -> mask logits, as
  `MultiScaleMaskDecoder.__call__`;
* `final_masks`: low-resolution logits -> original image size, as `postprocess.postprocess_masks`.

Where the official code hard-codes the released sizes, they are read from the config instead, and
equal the official values for the release (448 input, 32x32 patches): the LLM grid (official 16),
the combined mask size (official 128 = the last level's map), and the channel count of the level
gating (official 256). Levels l > 1 (never released; the official code only runs L <= 2) upsample
l times, as the JAX decoder does.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pixellm_jax.config import HeadConfig, ModelConfig
from pixellm_jax.convert.errors import ConversionError

# Source modules this head reads (below `prefix`); the prompt encoder's point embeddings and
# mask_downscaling are never used by PixelLM and are not read.
HEAD_MODULES = ("mm_projector", "out_mm_projector", "image_feature_neck", "prompt_encoder", "mask_decoder",
                "text_hidden_fcs")


class LayerNorm2d(nn.Module):
    """SAM's LayerNorm2d: every pixel of an NCHW map normalised over channels (biased variance)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class Attention(nn.Module):
    """SAM attention: q/k/v projected to dim / downsample_rate, split into heads, softmax(qk^T/sqrt(d))v."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1):
        super().__init__()
        inner = dim // downsample_rate
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        attn = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1]), dim=-1)
        out = (attn @ v).transpose(1, 2)
        return self.out_proj(out.reshape(out.shape[0], out.shape[1], -1))


class MLPBlock(nn.Module):
    """`lin2(relu(lin1(x)))`, the two-way transformer's feed-forward block."""

    def __init__(self, dim: int, mlp_dim: int):
        super().__init__()
        self.lin1 = nn.Linear(dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(torch.relu(self.lin1(x)))


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token->image attention, MLP, image->token attention, each post-normed.

    The first block's self-attention sees no positional encoding and replaces the tokens (no residual).
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int, skip_first_layer_pe: bool):
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, num_heads, downsample_rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, num_heads, downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                key_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, queries + query_pe, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """SAM's two-way transformer; the input tokens are their own positional encoding."""

    def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int):
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(dim, num_heads, mlp_dim, downsample_rate, i == 0) for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(dim, num_heads, downsample_rate)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor,
                tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image, image_pe [b, C, h, w], tokens [b, n, C] -> (tokens [b, n, C], image [b, h*w, C])."""
        keys = image.flatten(2).permute(0, 2, 1)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        out = self.final_attn_token_to_image(queries + tokens, keys + key_pe, keys)
        return self.norm_final_attn(queries + out), keys


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of pixel-centre coordinates; the [2, F] matrix is a saved buffer."""

    def __init__(self, num_pos_feats: int):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.zeros(2, num_pos_feats))

    def forward(self, h: int, w: int) -> torch.Tensor:
        """Dense encoding [2F, h, w]: channels sin then cos of 2π·((2x−1, 2y−1) @ G), x = (j+½)/w."""
        g = self.positional_encoding_gaussian_matrix
        ones = torch.ones(h, w, dtype=g.dtype, device=g.device)
        y = (ones.cumsum(0) - 0.5) / h
        x = (ones.cumsum(1) - 0.5) / w
        coords = (2 * torch.stack([x, y], dim=-1) - 1) @ g
        coords = 2 * np.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1).permute(2, 0, 1)


class PromptEncoder(nn.Module):
    """The prompt-encoder parts PixelLM uses: the dense positional encoding and `no_mask_embed`."""

    def __init__(self, dim: int):
        super().__init__()
        self.pe_layer = PositionEmbeddingRandom(dim // 2)
        self.no_mask_embed = nn.Embedding(1, dim)

    def dense_pe(self, h: int, w: int) -> torch.Tensor:
        """`get_dense_pe()` for an h x w feature grid, [1, C, h, w]."""
        return self.pe_layer(h, w)[None]

    def dense_prompt(self, n: int, h: int, w: int) -> torch.Tensor:
        """The dense embedding of n targets without mask prompts, [n, C, h, w]."""
        return self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, h, w)


class MLP(nn.Module):
    """`num_layers` Linear layers with ReLU between them (hypernetwork and IoU-head MLPs)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def _upscaling(dim: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(dim, out, kernel_size=2, stride=2), LayerNorm2d(out), nn.GELU())


class MaskDecoderMultiScale(nn.Module):
    """The official multi-scale mask decoder, one level per call (`predict_masks`)."""

    def __init__(self, head: HeadConfig):
        super().__init__()
        dim, levels, tokens = head.out_dim, head.scale_num, head.num_mask_tokens
        self.transformer = nn.ModuleList(
            TwoWayTransformer(head.decoder_depth, dim, head.decoder_heads, head.decoder_mlp_dim,
                              head.attention_downsample)
            for _ in range(levels)
        )
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(tokens, dim)
        self.output_upscaling = _upscaling(dim, dim // 8)
        if levels > 1:
            self.upsample_2x = _upscaling(dim, dim)
            self.pe1 = PositionEmbeddingRandom(dim // 2)
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(dim, dim, dim // 8, 3) for _ in range(tokens))
        self.iou_prediction_head = MLP(dim, dim, tokens, 3)  # computed upstream, never used: not run here
        self.level_embed = nn.Embedding(levels, dim)
        self.num_mask_tokens = tokens

    def predict_level(self, level: int, image: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                      dense: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        """Mask token 0's logits [n, 1, 2h', 2w'] of one level, for the n targets of one image.

        image [1, C, h, w] (the level's neck output), image_pe [1, C, h, w], sparse [n, 1, C] (the
        level's fused prompt), dense [n, C, h, w], previous: the previous level's result (level > 0).
        Level l > 0 upsamples its features (h' = 2^l h), gates them with sigmoid(previous) + 1, and
        uses `pe1` and the bilinearly resized dense prompt.
        """
        n = sparse.shape[0]
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], 0)[None].expand(n, -1, -1)
        tokens = torch.cat([out_tokens, sparse], 1) + self.level_embed.weight[level]
        src = torch.repeat_interleave(image, n, dim=0)
        if level > 0:
            for _ in range(level):
                src = self.upsample_2x(src)
            _, c, h, w = src.shape
            gate = torch.mean(previous, dim=1)[:, None].expand(-1, c, -1, -1)  # official: repeat to 256 channels
            src = (gate.sigmoid() + 1) * src
            image_pe = self.pe1(h, w)[None]
            dense = F.interpolate(dense.float(), size=(h, w), mode="bilinear", align_corners=False)
        src = src + dense
        pos = torch.repeat_interleave(image_pe, n, dim=0)
        b, c, h, w = src.shape
        hs, keys = self.transformer[level](src, pos, tokens)
        upscaled = self.output_upscaling(keys.transpose(1, 2).reshape(b, c, h, w))
        mask_out = hs[:, 1: 1 + self.num_mask_tokens]
        hyper = torch.stack([mlp(mask_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], 1)
        b, c, h, w = upscaled.shape
        masks = (hyper @ upscaled.reshape(b, c, h * w)).reshape(b, self.num_mask_tokens, h, w)
        return masks[:, 0:1]  # multimask_output=False


def _projector(in_dim: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out))


def _as_torch(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    from pixellm_jax.convert.readers import to_torch

    return to_torch(np.asarray(value))


class TorchPixelHead(nn.Module):
    """The PixelLM pixel head (official semantics, float32), attributes named as the official modules."""

    def __init__(self, model_cfg: ModelConfig):
        super().__init__()
        v, t, p, h = model_cfg.vision, model_cfg.text, model_cfg.projector, model_cfg.head
        hidden = p.hidden_mult * t.hidden_size
        self.mm_projector = _projector(v.hidden_size, hidden, t.hidden_size)
        if p.separate_out_projector:
            self.out_mm_projector = _projector(v.hidden_size, hidden, t.hidden_size)
        self.image_feature_neck = nn.Sequential(
            nn.Conv2d(t.hidden_size, h.out_dim, 1, bias=False), LayerNorm2d(h.out_dim),
            nn.Conv2d(h.out_dim, h.out_dim, 3, padding=1, bias=False), LayerNorm2d(h.out_dim),
        )
        self.prompt_encoder = PromptEncoder(h.out_dim)
        self.mask_decoder = MaskDecoderMultiScale(h)
        self.text_hidden_fcs = nn.ModuleList(
            [nn.Sequential(nn.Linear(t.hidden_size, t.hidden_size), nn.ReLU(), nn.Linear(t.hidden_size, h.out_dim),
                           nn.Dropout(0.0))]
        )
        self.grid, self.llm_grid = v.grid, p.llm_grid
        self.n, self.levels, self.out_dim = h.seg_token_num, h.scale_num, h.out_dim
        self.separate_out_projector = p.separate_out_projector

    # -- construction ---------------------------------------------------------------------------

    @staticmethod
    def source_keys(model_cfg: ModelConfig, prefix: str = "model.") -> list[str]:
        """The source keys `from_state` reads (read only these from a large checkpoint)."""
        with torch.device("meta"):
            names = list(TorchPixelHead(model_cfg).state_dict())
        return [prefix + name for name in names]

    @classmethod
    def from_state(cls, state: Mapping[str, object], model_cfg: ModelConfig, prefix: str = "model.") -> TorchPixelHead:
        """The head holding the source tensors `state[prefix + name]` (official names), cast to float32.

        `state` maps keys to torch tensors (or numpy arrays); keys of other modules are ignored. A
        missing key or a shape that does not fit `model_cfg` raises `ConversionError` naming it.
        """
        with torch.device("meta"):
            head = cls(model_cfg)
        expected = head.state_dict()
        missing = [prefix + name for name in expected if prefix + name not in state]
        if missing:
            raise ConversionError(f"pixel head: the source lacks {len(missing)} tensors, e.g. {missing[:4]}")
        loaded = {}
        for name, ref in expected.items():
            tensor = _as_torch(state[prefix + name])
            if tuple(tensor.shape) != tuple(ref.shape):
                raise ConversionError(f"{prefix + name}: shape {list(tensor.shape)}, but the model config "
                                      f"expects {list(ref.shape)}")
            loaded[name] = tensor.to(torch.float32).contiguous()
        head.load_state_dict(loaded, strict=True, assign=True)
        return head.eval()

    # -- stages ---------------------------------------------------------------------------------

    def _to_map(self, patches: torch.Tensor) -> torch.Tensor:
        """Row-major tokens [B, g*g, C] -> [B, C, g, g] (the official permute + view)."""
        b, n, c = patches.shape
        g = math.isqrt(n)
        if g * g != n:
            raise ValueError(f"expected a square grid of patch tokens, got {n}")
        return patches.permute(0, 2, 1).reshape(b, c, g, g)

    @torch.no_grad()
    def image_tokens(self, deep_patches: torch.Tensor) -> torch.Tensor:
        """The LLM's image tokens [B, llm_grid^2, H] from the deep CLIP patches [B, grid^2, C_vision].

        Official: bilinear resize (align_corners=False, fp32) of the patch map to the LLM grid (for a
        factor 2 this is 2x2 average pooling), flattened row-major, then `mm_projector`.
        """
        x = self._to_map(deep_patches.float())
        x = F.interpolate(x, size=(self.llm_grid, self.llm_grid), mode="bilinear", align_corners=False)
        return self.mm_projector(x.flatten(2).permute(0, 2, 1))

    @torch.no_grad()
    def decoder_features(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Neck outputs, one [B, C, grid, grid] per level (deep first), from CLIP patches [B, grid^2, C_vision].

        `features` are the CLIP taps in `vision.feature_layers` order (deep first); the first
        `scale_num` are used. Each goes through `out_mm_projector` (or `mm_projector` when the
        projector is shared), back to a map, and the shared neck.
        """
        if len(features) < self.levels:
            raise ValueError(f"the decoder has {self.levels} levels; got {len(features)} feature maps")
        proj = self.out_mm_projector if self.separate_out_projector else self.mm_projector
        return [self.image_feature_neck(self._to_map(proj(f.float()))) for f in features[: self.levels]]

    @torch.no_grad()
    def seg_embeddings(self, hidden: torch.Tensor, token_ids: torch.Tensor,
                       seg_ids: Sequence[int]) -> list[torch.Tensor]:
        """Fused prompts per row: a list of [n_targets, L, C], from final LLaMA states [Q, T, H].

        hidden must be aligned with token_ids [Q, T] (the image-expanded sequence). As the official
        code: `text_hidden_fcs` at every position; the state at p−1 for every codebook token at p;
        groups of N·L in order of occurrence, viewed as [targets, L, N, C]; a row whose count is not a
        multiple of N·L yields no targets (the inference rule); fusion `acc = e0*0; acc += s*e_i` with
        the fixed s = 1/(N·L) for N > 1, and the level's only state for N = 1.
        """
        states = self.text_hidden_fcs[0](hidden.float())
        ids = torch.as_tensor(token_ids)
        is_seg = torch.isin(ids, torch.as_tensor(list(seg_ids), dtype=ids.dtype))
        predicts = torch.cat([is_seg[:, 1:], torch.zeros_like(is_seg[:, :1])], dim=1)
        group = self.n * self.levels
        scalar = torch.ones([]) * (1.0 / group)  # the unregistered `multiseg_scalar` entries
        out = []
        for row in range(states.shape[0]):
            e = states[row][predicts[row]]
            if len(e) % group:
                e = e[:0]
            e = e.reshape(-1, self.levels, self.n, states.shape[-1])
            if self.n > 1:
                fused = e[:, :, 0] * 0
                for i in range(self.n):
                    fused = fused + scalar * e[:, :, i]
            else:
                fused = e[:, :, 0]
            out.append(fused)
        return out

    @torch.no_grad()
    def low_res_masks(self, features: Sequence[torch.Tensor] | torch.Tensor, prompts: torch.Tensor,
                      return_levels: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Mask logits [n, S, S] of one image's n targets (S = 2^L·grid: 128 for the release).

        features: the image's L neck outputs [C, grid, grid] (or stacked [L, C, grid, grid]);
        prompts [n, L, C], the targets' fused prompts. Level by level as `predict_masks`, mask
        token 0 only; then `low = Σ_l (1/L)·bilinear(m_l -> S)` in fp32 (the fixed
        `multiscale_scalar`; L = 1 returns level 0 as it is). With `return_levels`, also each
        level's [n, h_l, w_l] map.
        """
        emb = torch.stack(list(features)) if not isinstance(features, torch.Tensor) else features
        emb = emb.float()
        if emb.shape[0] != self.levels or prompts.shape[1] != self.levels:
            raise ValueError(f"the decoder has {self.levels} levels; got features {tuple(emb.shape)} and "
                             f"prompts {tuple(prompts.shape)}")
        n, (h, w) = prompts.shape[0], emb.shape[2:]
        sparse = prompts.float()
        dense = self.prompt_encoder.dense_prompt(n, h, w)
        pe = self.prompt_encoder.dense_pe(h, w)
        levels, previous = [], None
        for level in range(self.levels):
            previous = self.mask_decoder.predict_level(level, emb[level: level + 1], pe,
                                                       sparse[:, level: level + 1], dense, previous)
            levels.append(previous)
        if self.levels == 1:
            low = levels[0]
        else:
            size = tuple(levels[-1].shape[2:])
            low = levels[-1].new_zeros(n, 1, *size)
            scalar = torch.ones([]) * (1.0 / self.levels)
            for m in levels:
                low = low + scalar * F.interpolate(m.float(), size, mode="bilinear", align_corners=False)
        if return_levels:
            return low[:, 0], [m[:, 0] for m in levels]
        return low[:, 0]

    @torch.no_grad()
    def final_masks(self, low_res: torch.Tensor, resized_hw: Sequence[int],
                    original_hw: Sequence[int]) -> torch.Tensor:
        """`postprocess_masks`: logits [n, h, w] -> [n, H, W] at the original image size.

        resized_hw: (h', w') of the image after the longest-side resize (before padding); original_hw:
        (H, W). Bilinear (align_corners=False, fp32) to max(h', w') square, crop [:h', :w'], bilinear
        to (H, W). The binary mask is `logits > 0`.
        """
        rh, rw = (int(s) for s in resized_hw)
        target = max(rh, rw)
        x = F.interpolate(low_res[:, None].float(), (target, target), mode="bilinear", align_corners=False)
        x = x[..., :rh, :rw]
        x = F.interpolate(x, tuple(int(s) for s in original_hw), mode="bilinear", align_corners=False)
        return x[:, 0]
