"""Activation sharding constraints in the LLaMA decoder: present under a mesh, absent without one.

The tiny LLM is traced on the 8 simulated devices as a (data 2, fsdp 2, tensor 2) mesh: every
decoder-layer boundary constrains the hidden states to batch over (data, fsdp), q/k/v also put
heads over tensor, and the constrained forward computes the same numbers as the un-meshed one.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from pixellm_jax.config import MeshConfig, TextConfig
from pixellm_jax.mesh import make_mesh
from pixellm_jax.models.llama import LlamaModel
from pixellm_jax.sharding import constrain

TINY = TextConfig(
    vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
    rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=64,
)
BATCH, SEQ = 4, 8


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))


@pytest.fixture(scope="module")
def model_and_ids():
    cfg = TINY
    model = LlamaModel(cfg, None, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (BATCH, SEQ)))
    return model, ids


def _forward(model, ids):
    return model(ids).logits


def _constraint_specs(jaxpr_text: str) -> list[str]:
    """The PartitionSpecs of every sharding_constraint in a printed jaxpr (nested ones included)."""
    return re.findall(r"sharding_constraint\[.*?spec=(P\((?:[^()]|\([^()]*\))*\))", jaxpr_text, re.S)


def test_constraints_only_under_a_mesh(mesh, model_and_ids):
    model, ids = model_and_ids
    graphdef, state = nnx.split(model)
    fn = lambda s, x: _forward(nnx.merge(graphdef, s), x)  # noqa: E731

    assert "sharding_constraint" not in str(jax.make_jaxpr(fn)(state, ids))
    with jax.set_mesh(mesh):
        specs = _constraint_specs(str(jax.make_jaxpr(fn)(state, ids)))
    hidden = str(P(("data", "fsdp"), None, None))
    heads = str(P(("data", "fsdp"), None, "tensor", None))
    # per layer (the Python layer loop inlines every layer): hidden states in and out, q, k, v
    assert specs.count(hidden) == 2 * TINY.num_layers, specs
    assert specs.count(heads) == 3 * TINY.num_layers, specs
    assert len(specs) == 5 * TINY.num_layers


def test_constrained_forward_is_the_same_function(mesh, model_and_ids):
    model, ids = model_and_ids
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda s, x: _forward(nnx.merge(graphdef, s), x))
    plain = step(state, ids)
    with jax.set_mesh(mesh):
        lowered = step.lower(state, ids)
        meshed = lowered.compile()(state, ids)
    assert "sharding_constraint" in lowered.as_text() or "mhlo.sharding" in lowered.as_text()
    np.testing.assert_allclose(np.asarray(meshed), np.asarray(plain), atol=1e-6)


def test_constrain_leaves_dimensions_it_cannot_divide_to_xla(mesh):
    """A dimension its mesh axes do not divide is unconstrained, not replicated (which would gather it)."""

    def spec_of(x, axes):
        with jax.set_mesh(mesh):
            text = str(jax.make_jaxpr(lambda a: constrain(a, axes))(x))
        return _constraint_specs(text)

    assert spec_of(jnp.zeros((4, 3, 6)), ("batch", "length", "act_heads")) == [
        str(P(("data", "fsdp"), None, "tensor"))]
    assert spec_of(jnp.zeros((3, 3, 6)), ("batch", "length", "act_heads")) == [
        str(P(P.UNCONSTRAINED, None, "tensor"))]
    assert spec_of(jnp.zeros((3, 3, 5)), ("batch", None, "act_heads")) == [
        str(P(P.UNCONSTRAINED, None, P.UNCONSTRAINED))]
    assert spec_of(jnp.zeros((3, 5)), ("batch", "act_heads")) == []  # nothing left to constrain
    x = jnp.ones((3, 5))
    assert constrain(x, ("batch", "length")) is x  # no mesh in context: untouched
