"""LLaMA decoder with HF `LlamaForCausalLM` semantics, optional LoRA, remat, layer scan and a KV cache.

Parameter layout: the decoder layers are ONE `LlamaDecoderLayer` whose parameters are stacked on a
leading `layers` axis (built with `nnx.vmap`), whatever `scan_layers` says. `scan_layers=True` runs
them with `nnx.scan`; `scan_layers=False` runs a Python loop over per-layer slices. So a checkpoint
and the weight converter see one layout (`layers.self_attn.q_proj.kernel` is [L, H, heads*head_dim],
HF's `model.layers.{i}.self_attn.q_proj.weight` transposed is row i of it) and both settings compute
the same function. Attribute names otherwise mirror the HF state dict.

Numerics follow HF: RMSNorm normalises in float32, casts back, then multiplies by its weight; RoPE
is rotate-half with float32 `inv_freq`, angles and cos/sin, cast to the activation dtype; masks are
boolean (causal AND key padding) so two large negative masks are never added.

KV cache: `init_cache` gives a `KVCache` with keys/values [L, B, kv_heads, max_len, head_dim]
(heads-major: a decode step's attention reads each head's keys as one contiguous [max_len, head_dim]
matrix, no transpose), the key-validity mask [B, max_len] (it carries the prompt's padding) and the
next write slot `index`. Each call writes its T tokens at slots index..index+T-1 and attends causally
in slot order, so a prefill over a padded prompt followed by single-token steps equals recomputing
the whole sequence with the same attention mask and positions. Positions default to
`index + arange(T)` (plain arange from 0 without a cache, as PixelLM uses even with padding); pass
them explicitly for anything else. The caller keeps index + T <= max_len (writes past the end are
clamped by XLA, not detected). `prefill=True` says the cache is empty: the T tokens are written to it
but attend only among themselves (key padding + causal, as without a cache), not over all max_len
slots, most of them still empty (with an answer budget of 512 tokens, several times the work).

Decode loops: in a `while_loop` over steps, a stacked cache and stacked layer weights are sliced per
layer per step (XLA:CPU copies each slice, and the scan restacks the cache: several full copies of
the cache and of the layer weights per token). `unstack_cache` turns the cache into one buffer per
layer and `unstacked_layers` the weights into one module per layer, both once before the loop; a
call with an unstacked cache runs the layers as a Python loop over those modules, so each step
writes its cache slot in place and reads the weights where they are.

Attention runs through `models/attention.py` with the `attention` implementation. Without a cache
(and in a prefill) it gets the key-padding mask plus `causal=True`; with a cache the queries sit at
a traced offset, so it gets the dense causal-and-padding mask, and "pallas_tpu" (whose causal mask
is static) is replaced by "xla" for those calls: the Pallas kernel serves the cache-free forward.

Run the model under NNX transforms (`nnx.jit`, `nnx.value_and_grad`, ...) or merge it inside the
innermost JAX transform: `nnx.scan`/`nnx.remat` refuse Variables captured from an outer JAX trace.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pixellm_jax.config import LoraConfig, TextConfig
from pixellm_jax.models.attention import Impl, dot_product_attention
from pixellm_jax.models.layers import axes_meta, embed, linear
from pixellm_jax.models.lora import LoRALinear
from pixellm_jax.sharding import constrain

# Activation layouts (logical names, mapped onto the mesh by `sharding.LOGICAL_RULES`); applied only
# under a mesh in context. Hidden states: batch over data×fsdp; q/k/v: heads over tensor as well.
HIDDEN_AXES = ("batch", "length", "act_embed")
_Q_AXES = ("batch", "length", "act_heads", "head_dim")
_KV_AXES = ("batch", "length", "act_kv_heads", "head_dim")

_INIT = nnx.initializers.normal(0.02)  # HF LlamaPreTrainedModel: N(0, initializer_range)


class KVCache(NamedTuple):
    """Decoding state: per-layer keys/values, which key slots are valid, and the next write slot.

    k / v are stacked arrays [layers, batch, kv_heads, max_len, head_dim] (`init_cache`), or tuples
    of one [batch, kv_heads, max_len, head_dim] array per layer (`LlamaModel.unstack_cache`).
    """

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    mask: jax.Array  # [batch, max_len] bool
    index: jax.Array  # [] int32

    @property
    def unstacked(self) -> bool:
        return isinstance(self.k, (tuple, list))


class LlamaOutput(NamedTuple):
    logits: jax.Array  # [batch, len, vocab]
    hidden: jax.Array  # [batch, len, hidden], after the final norm
    cache: KVCache | None


class RMSNorm(nnx.Module):
    """HF LlamaRMSNorm: x * rsqrt(mean(x^2) + eps) in float32, cast back, times `weight`."""

    def __init__(self, dim: int, eps: float, *, dtype=None, param_dtype=jnp.float32):
        self.eps = eps
        self.dtype = dtype
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), **axes_meta(("embed",)))

    @jax.named_scope("rms_norm")
    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)).astype(x.dtype)
        dtype = self.dtype or jnp.result_type(x, self.weight[...])
        return self.weight[...].astype(dtype) * y.astype(dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin [..., head_dim] in float32 for integer positions [...], built as HF builds them."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on x [B, T, heads, head_dim] with cos/sin [B, T, head_dim]."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def _projection(
    name: str,
    in_features: int,
    out_features: int,
    axes: tuple[str, str],
    lora: LoraConfig | None,
    *,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
) -> nnx.Linear | LoRALinear:
    """A bias-free projection; a `LoRALinear` when LoRA is enabled and targets `name`."""
    if lora is not None and lora.enabled and name in lora.targets:
        return LoRALinear(
            in_features, out_features, lora, axes, dtype=dtype, param_dtype=param_dtype,
            kernel_init=_INIT, rngs=rngs,
        )
    return linear(
        in_features, out_features, axes, use_bias=False, dtype=dtype, param_dtype=param_dtype,
        kernel_init=_INIT, rngs=rngs,
    )


def _apply(proj: nnx.Module, x: jax.Array, deterministic: bool) -> jax.Array:
    return proj(x, deterministic=deterministic) if isinstance(proj, LoRALinear) else proj(x)


class LlamaAttention(nnx.Module):
    """Multi-head / grouped-query self-attention with RoPE and an optional per-layer KV cache."""

    def __init__(
        self, cfg: TextConfig, lora: LoraConfig | None, *, dtype, param_dtype, attention: Impl = "xla",
        rngs: nnx.Rngs,
    ):
        self.attention = attention
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        h, d = cfg.hidden_size, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = _projection("q_proj", h, cfg.num_heads * d, ("embed", "heads"), lora, **kw)
        self.k_proj = _projection("k_proj", h, cfg.num_kv_heads * d, ("embed", "kv_heads"), lora, **kw)
        self.v_proj = _projection("v_proj", h, cfg.num_kv_heads * d, ("embed", "kv_heads"), lora, **kw)
        self.o_proj = _projection("o_proj", cfg.num_heads * d, h, ("heads", "embed"), lora, **kw)

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array,
        kv: tuple[jax.Array, jax.Array] | None,
        index: jax.Array | None,
        deterministic: bool,
        causal: bool,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """x [B, T, H]; mask [B, 1, T or 1, S] bool, AND key <= query if `causal`; kv this layer's
        cache [B, kv, S, d] (keys, values) or None. With a cache, the new keys/values are written at
        slot `index`; the queries attend over the whole cache, or (`causal`: a prefill) over the T
        new keys only."""
        b, t, _ = x.shape
        with jax.named_scope("qkv_proj"):  # scopes name the ops in profiles (tools/profile_generate.py)
            q = _apply(self.q_proj, x, deterministic).reshape(b, t, self.num_heads, self.head_dim)
            k = _apply(self.k_proj, x, deterministic).reshape(b, t, self.num_kv_heads, self.head_dim)
            v = _apply(self.v_proj, x, deterministic).reshape(b, t, self.num_kv_heads, self.head_dim)
        with jax.named_scope("rope"):
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = constrain(q, _Q_AXES), constrain(k, _KV_AXES), constrain(v, _KV_AXES)
        if kv is not None:
            with jax.named_scope("kv_cache_update"):
                k_cache, v_cache = kv
                start = (0, 0, index, 0)
                k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype).transpose(0, 2, 1, 3), start)
                v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype).transpose(0, 2, 1, 3), start)
                kv = (k_cache, v_cache)
            if not causal:  # [B, S, kv, d] views: XLA folds the transposes into the attention's dots
                k, v = k_cache.transpose(0, 2, 1, 3).astype(q.dtype), v_cache.transpose(0, 2, 1, 3).astype(q.dtype)
        impl = "xla" if not causal and self.attention == "pallas_tpu" else self.attention
        with jax.named_scope("attention"):
            out = dot_product_attention(q, k, v, mask, causal=causal, impl=impl)
        with jax.named_scope("o_proj"):
            return _apply(self.o_proj, out.reshape(b, t, -1), deterministic), kv


class LlamaMLP(nnx.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: TextConfig, lora: LoraConfig | None, *, dtype, param_dtype, rngs: nnx.Rngs):
        h, m = cfg.hidden_size, cfg.intermediate_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = _projection("gate_proj", h, m, ("embed", "mlp"), lora, **kw)
        self.up_proj = _projection("up_proj", h, m, ("embed", "mlp"), lora, **kw)
        self.down_proj = _projection("down_proj", m, h, ("mlp", "embed"), lora, **kw)

    @jax.named_scope("mlp")
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        gate = jax.nn.silu(_apply(self.gate_proj, x, deterministic))
        return _apply(self.down_proj, gate * _apply(self.up_proj, x, deterministic), deterministic)


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self, cfg: TextConfig, lora: LoraConfig | None, *, dtype, param_dtype, attention: Impl = "xla",
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.self_attn = LlamaAttention(cfg, lora, attention=attention, rngs=rngs, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = LlamaMLP(cfg, lora, rngs=rngs, **kw)

    def __call__(self, x, cos, sin, mask, kv, index, deterministic: bool, causal: bool):
        attn, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, index, deterministic, causal)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x), deterministic)
        return x, kv


_REMAT_POLICIES = {
    # Save nothing but the layer inputs; recompute the whole layer in the backward pass.
    "full": None,
    # Save the projection matmuls (no batch dims); recompute attention scores, norms, activations.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class LlamaModel(nnx.Module):
    """`LlamaForCausalLM`: embed_tokens, stacked decoder layers, final norm, untied lm_head.

    `dtype` is the compute dtype, `param_dtype` the storage dtype of every base weight; LoRA factors
    are always float32. `attention` picks the attention implementation (models/attention.py).
    """

    def __init__(
        self,
        cfg: TextConfig,
        lora: LoraConfig | None = None,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        attention: Impl = "xla",
        rngs: nnx.Rngs,
    ):
        self.cfg = cfg
        self.dtype = dtype
        self.embed_tokens = embed(
            cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), dtype=dtype, param_dtype=param_dtype,
            init=_INIT, rngs=rngs,
        )

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs: nnx.Rngs) -> LlamaDecoderLayer:
            return LlamaDecoderLayer(cfg, lora, dtype=dtype, param_dtype=param_dtype, attention=attention, rngs=rngs)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.lm_head = linear(
            cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), use_bias=False, dtype=dtype,
            param_dtype=param_dtype, kernel_init=_INIT, rngs=rngs,
        )

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings [B, T, H] (the multimodal model splices image features into these)."""
        return self.embed_tokens(input_ids)

    def init_cache(self, batch: int, max_len: int, dtype=None, unstacked: bool = False) -> KVCache:
        """An empty cache for `batch` sequences of up to `max_len` tokens (keys/values in `dtype`);
        `unstacked`: one buffer per layer (see `unstack_cache`)."""
        c = self.cfg
        dtype = dtype or self.dtype
        mask, index = jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32)
        if unstacked:
            shape = (batch, c.num_kv_heads, max_len, c.head_dim)
            k = tuple(jnp.zeros(shape, dtype) for _ in range(c.num_layers))
            v = tuple(jnp.zeros(shape, dtype) for _ in range(c.num_layers))
            return KVCache(k=k, v=v, mask=mask, index=index)
        shape = (c.num_layers, batch, c.num_kv_heads, max_len, c.head_dim)
        return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), mask=mask, index=index)

    @staticmethod
    def unstack_cache(cache: KVCache) -> KVCache:
        """`cache` with one key and one value buffer per layer (copied once; see the module doc)."""
        if cache.unstacked:
            return cache
        return cache._replace(k=tuple(cache.k), v=tuple(cache.v))

    def unstacked_layers(self) -> tuple[LlamaDecoderLayer, ...]:
        """The decoder layers as one module each, their parameters sliced out of the stack (copied).

        Slice once, outside a decode loop, and pass them to every step (`layers=`); the modules
        share nothing with `self.layers` (updating them does not update the model).
        """
        graphdef, state = nnx.split(self.layers)
        with jax.named_scope("layer_slices"):
            states = [jax.tree.map(lambda a: a[i], state) for i in range(self.cfg.num_layers)]
        return tuple(nnx.merge(graphdef, s) for s in states)

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        *,
        input_embeds: jax.Array | None = None,
        deterministic: bool = True,
        layers: tuple[LlamaDecoderLayer, ...] | None = None,
        prefill: bool = False,
    ) -> LlamaOutput:
        """Logits and final hidden states for `input_ids` [B, T] or `input_embeds` [B, T, H].

        attention_mask [B, T] bool (True = real token, default all True); positions [B, T] or [T]
        (default `offset + arange(T)`, offset = cache index or 0); with `cache`, the new tokens are
        appended to it and the updated cache is returned. With an unstacked cache the layers run one
        by one, from `layers` (`unstacked_layers()`, sliced once by the caller) or sliced here.
        `prefill`: the cache is empty, the new tokens attend only among themselves (module doc).
        """
        if (input_ids is None) == (input_embeds is None):
            raise ValueError("LlamaModel: pass exactly one of input_ids and input_embeds")
        x = self.embed(input_ids) if input_embeds is None else input_embeds.astype(self.dtype)
        b, t, _ = x.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        if attention_mask.shape != (b, t):
            raise ValueError(f"LlamaModel: attention_mask has shape {attention_mask.shape}, expected {(b, t)}")
        attention_mask = attention_mask.astype(bool)
        offset = jnp.zeros((), jnp.int32) if cache is None else cache.index
        if positions is None:
            positions = offset + jnp.arange(t, dtype=jnp.int32)
        positions = jnp.broadcast_to(positions, (b, t))
        cos, sin = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta)

        if cache is None or prefill:
            # Queries and keys are the same T slots: key padding plus the attention's causal flag.
            mask, causal = attention_mask[:, None, None, :], True
            key_valid = attention_mask
            kv = None
            if cache is not None:  # written to the cache, which holds nothing else to attend to
                key_valid = jax.lax.dynamic_update_slice(cache.mask, attention_mask, (0, cache.index))
                kv = (cache.k, cache.v)
        else:
            key_valid = jax.lax.dynamic_update_slice(cache.mask, attention_mask, (0, cache.index))
            kv = (cache.k, cache.v)
            query_slots = offset + jnp.arange(t)
            in_order = jnp.arange(key_valid.shape[1])[None, :] <= query_slots[:, None]
            mask, causal = in_order[None, None] & key_valid[:, None, None, :], False

        if cache is not None and cache.unstacked:
            x, kv = self._run_unstacked(x, kv, layers, cos, sin, mask, offset, deterministic, causal)
        else:
            x, kv = self._run_layers(x, kv, cos, sin, mask, offset, deterministic, causal)
        hidden = self.norm(x)
        with jax.named_scope("lm_head"):
            logits = self.lm_head(hidden)
        new_cache = None if cache is None else KVCache(kv[0], kv[1], key_valid, cache.index + t)
        return LlamaOutput(logits=logits, hidden=hidden, cache=new_cache)

    def _run_unstacked(self, x, kv, layers, cos, sin, mask, index, deterministic: bool, causal: bool):
        """The layers one by one over per-layer caches (no remat: this is the inference path)."""
        if layers is None:
            layers = self.unstacked_layers()
        if len(layers) != self.cfg.num_layers or len(kv[0]) != self.cfg.num_layers:
            raise ValueError(f"LlamaModel: {len(layers)} layers and {len(kv[0])} cache layers for a "
                             f"{self.cfg.num_layers}-layer model")
        ks, vs = [], []
        for layer, k, v in zip(layers, *kv):
            x, (k, v) = layer(constrain(x, HIDDEN_AXES), cos, sin, mask, (k, v), index, deterministic, causal)
            x = constrain(x, HIDDEN_AXES)
            ks.append(k)
            vs.append(v)
        return x, (tuple(ks), tuple(vs))

    def _run_layers(self, x, kv, cos, sin, mask, index, deterministic: bool, causal: bool):
        """All decoder layers, by `nnx.scan` or a Python loop over the stacked parameters."""

        def step(layer: LlamaDecoderLayer, x, kv, cos, sin, mask, index):
            """One layer as a function of (layer, carry, its cache slices) for scan, remat and the loop;
            the hidden states are constrained to `HIDDEN_AXES` on entry and exit."""
            x, kv = layer(constrain(x, HIDDEN_AXES), cos, sin, mask, kv, index, deterministic, causal)
            return constrain(x, HIDDEN_AXES), kv

        if self.cfg.remat != "none":
            step = nnx.remat(step, policy=_REMAT_POLICIES[self.cfg.remat], prevent_cse=not self.cfg.scan_layers)

        if self.cfg.scan_layers:
            scan = nnx.scan(
                step,
                in_axes=(0, nnx.Carry, 0, None, None, None, None),
                out_axes=(nnx.Carry, 0),
                transform_metadata={nnx.PARTITION_NAME: "layers"},
            )
            return scan(self.layers, x, kv, cos, sin, mask, index)

        graphdef, state = nnx.split(self.layers)
        rng_states = []
        for i in range(self.cfg.num_layers):
            with jax.named_scope("layer_slices"):
                layer_state = jax.tree.map(lambda a: a[i], state)
            layer = nnx.merge(graphdef, layer_state)
            kv_i = None if kv is None else (kv[0][i], kv[1][i])
            x, kv_i = step(layer, x, kv_i, cos, sin, mask, index)
            if kv is not None:
                kv = (kv[0].at[i].set(kv_i[0]), kv[1].at[i].set(kv_i[1]))
            rng_states.append(nnx.state(layer, nnx.RngState))
        # Dropout streams advance inside the layers; write their per-layer state back.
        nnx.update(self.layers, jax.tree.map(lambda *a: jnp.stack(a), *rng_states))
        return x, kv
