"""Small layer factories that attach logical axis names to every parameter.

Every parameter of the project carries `out_sharding` metadata with *logical* axis names
(see `pixellm_jax.sharding.LOGICAL_RULES`); the training code maps them onto the mesh. Eager sharding
is off so that modules can be built without a mesh.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = Sequence[str | None]


def axes_meta(axes: Axes) -> dict:
    """Variable metadata naming the logical axes of a parameter."""
    return {"out_sharding": tuple(axes), "eager_sharding": False}


def param(rngs: nnx.Rngs, init, shape: Sequence[int], axes: Axes, dtype=jnp.float32) -> nnx.Param:
    """A free-standing parameter with logical axis names."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {tuple(axes)} do not match shape {tuple(shape)}")
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), **axes_meta(axes))


def linear(
    in_features: int,
    out_features: int,
    axes: tuple[str | None, str | None],
    *,
    rngs: nnx.Rngs,
    use_bias: bool = True,
    dtype=None,
    param_dtype=jnp.float32,
    kernel_init=None,
) -> nnx.Linear:
    """`nnx.Linear` (kernel [in, out] = PyTorch weight transposed) with logical axes."""
    kwargs = {} if kernel_init is None else {"kernel_init": kernel_init}
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
        kernel_metadata=axes_meta(axes),
        bias_metadata=axes_meta(axes[1:]),
        **kwargs,
    )


def layer_norm(
    dim: int, axis: str | None, *, eps: float, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32
) -> nnx.LayerNorm:
    """LayerNorm with PyTorch semantics: exact (two-pass) variance and an explicit epsilon."""
    return nnx.LayerNorm(
        dim,
        epsilon=eps,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
        scale_metadata=axes_meta((axis,)),
        bias_metadata=axes_meta((axis,)),
    )


def embed(
    num: int, dim: int, axes: tuple[str | None, str | None], *, rngs: nnx.Rngs, dtype=None,
    param_dtype=jnp.float32, init=jax.nn.initializers.normal(0.02),
) -> nnx.Embed:
    """Embedding table [num, dim] with logical axes."""
    return nnx.Embed(
        num, dim, dtype=dtype, param_dtype=param_dtype, embedding_init=init, rngs=rngs,
        embedding_metadata=axes_meta(axes),
    )


def gelu_exact(x: jax.Array) -> jax.Array:
    """PyTorch `nn.GELU()` (erf form); jax.nn.gelu defaults to the tanh approximation."""
    return jax.nn.gelu(x, approximate=False)


def quick_gelu(x: jax.Array) -> jax.Array:
    """CLIP's activation: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)
