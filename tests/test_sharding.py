"""Logical axis rules -> mesh PartitionSpecs."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from pixellm_jax.models.layers import layer_norm, linear
from pixellm_jax.sharding import logical_spec, state_shardings


def test_logical_spec_maps_and_never_reuses_a_mesh_axis():
    assert logical_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert logical_spec(("vocab", "embed")) == P("tensor", "fsdp")
    assert logical_spec(("batch", "length", "embed")) == P(("data", "fsdp"), None, None)  # fsdp used by batch
    assert logical_spec((None, "layers")) == P(None, None)
    with pytest.raises(KeyError, match="no sharding rule"):
        logical_spec(("nonsense",))


def test_state_shardings_on_8_devices():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.up = linear(16, 32, ("embed", "mlp"), rngs=rngs)
            self.norm = layer_norm(16, "embed", eps=1e-5, rngs=rngs)
            self.odd = linear(16, 3, ("embed", "mlp"), rngs=rngs)  # 3 is not divisible by tensor=2

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    model = Block(nnx.Rngs(0))
    sh = state_shardings(nnx.state(model), mesh)
    assert sh["up"]["kernel"].spec == P("fsdp", "tensor")
    assert sh["up"]["bias"].spec == P("tensor")
    assert sh["norm"]["scale"].spec == P("fsdp")
    assert sh["odd"]["kernel"].spec == P("fsdp", None)
    placed = jax.device_put(nnx.state(model), sh)
    assert placed["up"]["kernel"].get_value().sharding.spec == P("fsdp", "tensor")
