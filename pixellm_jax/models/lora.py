"""Low-rank adapters (LoRA) with peft semantics: y = x W + b + s * dropout(x) A B, s = alpha / r.

The base kernel is an ordinary (frozen) `nnx.Param` named `kernel`, exactly where a plain linear
layer keeps it, so weight conversion does not care whether a projection carries an adapter. The
adapter factors are `LoRAParam`s, a subclass of `nnx.Param`, so optimizers and gradient filters can
select them (`nnx.state(model, LoRAParam)`) while everything that handles `nnx.Param` still sees them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pixellm_jax.config import LoraConfig
from pixellm_jax.models.layers import axes_meta


class LoRAParam(nnx.Param):
    """A trainable LoRA factor (`lora_a` or `lora_b`)."""


def kaiming_uniform_a_sqrt5(key: jax.Array, shape: tuple[int, int], dtype=jnp.float32) -> jax.Array:
    """torch `kaiming_uniform_(w, a=sqrt(5))` on the [r, in] torch weight, laid out [in, r].

    gain = sqrt(2 / (1 + a^2)) = sqrt(1/3) and bound = gain * sqrt(3 / fan_in) = 1 / sqrt(in).
    """
    bound = 1.0 / (shape[0] ** 0.5)
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)


class LoRALinear(nnx.Module):
    """A linear layer (kernel [in, out], optional bias) with a rank-r adapter.

    `merge()` folds the adapter into the kernel (W += s A B) and `unmerge()` takes it out again; a
    merged layer skips the adapter in the forward pass so it is never counted twice. Both are eager
    operations on a concrete model (export, inference), not something to call inside a traced step.
    The adapter runs in the factors' dtype (float32), as peft does, and is added in the output dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        lora: LoraConfig,
        axes: tuple[str | None, str | None],
        *,
        use_bias: bool = False,
        dtype=None,
        param_dtype=jnp.float32,
        lora_param_dtype=jnp.float32,
        kernel_init=nnx.initializers.lecun_normal(),
        rngs: nnx.Rngs,
    ):
        in_axis, out_axis = axes
        self.dtype = dtype
        self.scaling = float(lora.scaling)
        self.kernel = nnx.Param(
            kernel_init(rngs.params(), (in_features, out_features), param_dtype),
            **axes_meta(axes),
        )
        self.bias = (
            nnx.Param(jnp.zeros((out_features,), param_dtype), **axes_meta((out_axis,)))
            if use_bias
            else nnx.data(None)
        )
        self.lora_a = LoRAParam(
            kaiming_uniform_a_sqrt5(rngs.params(), (in_features, lora.rank), lora_param_dtype),
            **axes_meta((in_axis, "lora_rank")),
        )
        self.lora_b = LoRAParam(
            jnp.zeros((lora.rank, out_features), lora_param_dtype), **axes_meta(("lora_rank", out_axis))
        )
        # A dropout stream is kept only when there is dropout to draw.
        self.dropout = nnx.Dropout(lora.dropout, rngs=rngs if lora.dropout > 0 else None)
        self.merged = False

    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """x [..., in] -> [..., out]; dropout on the adapter input only when not deterministic."""
        dtype = self.dtype or jnp.result_type(x, self.kernel[...])
        y = jnp.matmul(x.astype(dtype), self.kernel[...].astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        if self.merged:
            return y
        a, b = self.lora_a[...], self.lora_b[...]
        h = self.dropout(x, deterministic=deterministic).astype(a.dtype)
        return y + (jnp.matmul(jnp.matmul(h, a), b) * self.scaling).astype(y.dtype)

    def delta(self) -> jax.Array:
        """The adapter's weight update s * A @ B in float32 ([..., in, out]; stacked layers batch)."""
        a = self.lora_a[...].astype(jnp.float32)
        b = self.lora_b[...].astype(jnp.float32)
        return jnp.matmul(a, b) * self.scaling

    def merge(self, dtype=None) -> None:
        """W <- W + s A B (computed in float32, stored in `dtype`, default the kernel's dtype)."""
        if self.merged:
            raise ValueError("LoRALinear.merge: the adapter is already merged")
        w = self.kernel[...]
        self.kernel.set_value((w.astype(jnp.float32) + self.delta()).astype(dtype or w.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """W <- W - s A B, undoing `merge` (exact up to rounding in the kernel's dtype)."""
        if not self.merged:
            raise ValueError("LoRALinear.unmerge: the adapter is not merged")
        w = self.kernel[...]
        self.kernel[...] = (w.astype(jnp.float32) - self.delta()).astype(w.dtype)
        self.merged = False


def merge_lora(model: nnx.Module, dtype=None) -> None:
    """Merge every unmerged `LoRALinear` adapter of `model` into its kernel (eagerly, in place), the
    merged kernels stored in `dtype` (default: each kernel's own; an fp32 export of a bf16-stored
    model merges in fp32, so it equals the unmerged model's computation)."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, LoRALinear) and not module.merged:
            module.merge(dtype)


def unmerge_lora(model: nnx.Module) -> None:
    """Take every merged `LoRALinear` adapter of `model` back out of its kernel (eagerly, in place)."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, LoRALinear) and module.merged:
            module.unmerge()
