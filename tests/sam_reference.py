"""The segment-anything package as a PyTorch reference, and torch -> NNX weight copying for tests.

segment-anything imports a few torchvision names at package import (only its automatic mask
generator and resize transform use them). torchvision is not installed beside our torch, so
stand-in modules are registered in `sys.modules` for the duration of the import and removed again.
"""

from __future__ import annotations

import importlib
import sys
import types

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from torch import nn

# torchvision module -> names segment_anything imports from it
_TORCHVISION_NAMES = {
    "torchvision.ops.boxes": ("batched_nms", "box_area"),
    "torchvision.transforms.functional": ("resize", "to_pil_image"),
}


def _stand_in(qualname: str):
    def unavailable(*args, **kwargs):
        raise RuntimeError(f"{qualname} is a test stand-in; torchvision is not installed")

    unavailable.__name__ = qualname.rsplit(".", 1)[1]
    return unavailable


def _torchvision_stand_ins() -> dict[str, types.ModuleType]:
    modules: dict[str, types.ModuleType] = {}
    for path, names in _TORCHVISION_NAMES.items():
        parts = path.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name not in modules:
                modules[name] = types.ModuleType(name)
                if i > 1:
                    setattr(modules[".".join(parts[: i - 1])], parts[i - 1], modules[name])
        for attr in names:
            setattr(modules[path], attr, _stand_in(f"{path}.{attr}"))
    return modules


def _import_segment_anything_modeling():
    stand_ins = _torchvision_stand_ins()
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        return (
            importlib.import_module("segment_anything.modeling.common"),
            importlib.import_module("segment_anything.modeling.transformer"),
            importlib.import_module("segment_anything.modeling.prompt_encoder"),
            importlib.import_module("segment_anything.modeling.mask_decoder"),
        )
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


_common, _transformer, _prompt_encoder, _mask_decoder = _import_segment_anything_modeling()
LayerNorm2d = _common.LayerNorm2d
MLPBlock = _common.MLPBlock
Attention = _transformer.Attention
TwoWayAttentionBlock = _transformer.TwoWayAttentionBlock
TwoWayTransformer = _transformer.TwoWayTransformer
PositionEmbeddingRandom = _prompt_encoder.PositionEmbeddingRandom
MLP = _mask_decoder.MLP


def redraw_(module: nn.Module, seed: int) -> nn.Module:
    """Redraw every weight larger than PyTorch's defaults so that parity tests can fail.

    Norm weights 1 +- 0.1, biases std 0.05, embeddings std 0.5, other weights std 0.1; random
    positional-encoding buffers keep their N(0, 1) draw.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            for name, p in sub.named_parameters(recurse=False):
                if isinstance(sub, (nn.LayerNorm, LayerNorm2d)) and name == "weight":
                    p.copy_(1 + 0.2 * (torch.rand(p.shape, generator=g) - 0.5))
                elif name == "bias":
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
                elif isinstance(sub, nn.Embedding):
                    p.copy_(0.5 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _set(var: nnx.Variable, value: np.ndarray) -> None:
    value = np.ascontiguousarray(value)
    current = var.get_value()
    if tuple(current.shape) != value.shape:
        raise ValueError(f"shape {value.shape} does not fit variable of shape {current.shape}")
    var.set_value(jnp.asarray(value, dtype=current.dtype))


def _leaf_arrays(mod: nn.Module) -> dict[str, np.ndarray] | None:
    """NNX variable name -> array of the weights a PyTorch module holds itself; None if it holds none."""
    if isinstance(mod, nn.Linear):
        out = {"kernel": _np(mod.weight).T}
    elif isinstance(mod, (nn.LayerNorm, LayerNorm2d)):
        out = {"scale": _np(mod.weight)}
    elif isinstance(mod, nn.Embedding):
        out = {"embedding": _np(mod.weight)}
    elif isinstance(mod, nn.ConvTranspose2d):  # [in, out, kh, kw] -> [kh, kw, in, out], spatially flipped
        out = {"kernel": _np(mod.weight).transpose(2, 3, 0, 1)[::-1, ::-1]}
    elif isinstance(mod, nn.Conv2d):  # OIHW -> HWIO
        out = {"kernel": _np(mod.weight).transpose(2, 3, 1, 0)}
    else:  # anything else: its own parameters and buffers under their own names (may be none)
        own = list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
        return {n: _np(t) for n, t in own} or None
    if getattr(mod, "bias", None) is not None:
        out["bias"] = _np(mod.bias)
    return out


def copy_into(torch_module: nn.Module, nnx_module: nnx.Module) -> dict[str, str]:
    """Copy every weight of `torch_module` into the NNX module of the same structure.

    Submodule names are followed attribute by attribute; an index into a PyTorch `nn.Sequential`
    becomes `layers/<i>` (nnx.Sequential), an index into an `nn.ModuleList` stays `<i>`. Fails unless
    every PyTorch weight and every NNX variable is used exactly once. Returns torch key -> NNX path.
    """
    mapping: dict[str, str] = {}
    for name, mod in torch_module.named_modules():
        arrays = _leaf_arrays(mod)
        if arrays is None:
            continue
        target, path, parent = nnx_module, [], torch_module
        for part in name.split(".") if name else []:
            if isinstance(parent, nn.Sequential):
                target, path = target.layers[int(part)], path + ["layers", part]
            elif part.isdigit():
                target, path = target[int(part)], path + [part]
            else:
                target, path = getattr(target, part), path + [part]
            parent = getattr(parent, part)
        for var_name, value in arrays.items():
            _set(getattr(target, var_name), value)
            torch_name = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(var_name, var_name)
            mapping[".".join(filter(None, [name, torch_name]))] = "/".join(path + [var_name])

    torch_keys = set(torch_module.state_dict())
    nnx_paths = {"/".join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(nnx_module))}
    if set(mapping) != torch_keys or set(mapping.values()) != nnx_paths:
        raise AssertionError(
            f"weights not copied one to one: torch only {sorted(torch_keys - set(mapping))}, "
            f"nnx only {sorted(nnx_paths - set(mapping.values()))}"
        )
    return mapping


def abstract(factory):
    """Build an NNX module without running its initialisers (fast); `copy_into` fills it in."""
    return nnx.eval_shape(factory)


def run(module: nnx.Module, *args, **static_kwargs):
    """Call `module(*args, **static_kwargs)` under one jit (much faster than op-by-op on CPU)."""
    return nnx.jit(lambda m, *a: m(*a, **static_kwargs))(module, *args)


def nhwc(t: torch.Tensor) -> np.ndarray:
    """A PyTorch [b, c, h, w] map as a channels-last numpy array."""
    return _np(t.permute(0, 2, 3, 1))
