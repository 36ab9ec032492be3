"""`take_in_groups`: the same rows as `jnp.take`, and on a sharded batch no all-gather of the rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from pixellm_jax.config import MeshConfig
from pixellm_jax.mesh import make_mesh
from pixellm_jax.models.grouped_take import take_in_groups


def _aligned_index(rng, rows: int, n: int, groups: int) -> np.ndarray:
    """n indices, block g of them pointing into block g of `rows` rows."""
    per, per_n = rows // groups, n // groups
    return np.concatenate([g * per + rng.integers(0, per, per_n) for g in range(groups)]).astype(np.int32)


@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_equals_take_for_indices_in_their_block(groups):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 5, 3)).astype(np.float32)
    index = _aligned_index(rng, 8, 24, groups)
    np.testing.assert_array_equal(np.asarray(take_in_groups(jnp.asarray(x), jnp.asarray(index), groups)), x[index])


def test_gradient_equals_takes():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 6)).astype(np.float32))
    index = jnp.asarray(_aligned_index(rng, 4, 8, 2))
    w = jnp.asarray(rng.normal(size=(8, 6)).astype(np.float32))
    got = jax.grad(lambda x: (take_in_groups(x, index, 2) * w).sum())(x)
    want = jax.grad(lambda x: (jnp.take(x, index, axis=0) * w).sum())(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


def test_indivisible_groups_raise():
    with pytest.raises(ValueError, match="do not split into 4 equal groups"):
        take_in_groups(jnp.zeros((6, 2)), jnp.zeros((8,), jnp.int32), 4)


def test_sharded_batch_gathers_without_collectives():
    """On 8 devices (batch over fsdp) the plain take all-gathers the rows; the grouped one does not."""
    mesh = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    x = jax.device_put(np.arange(16 * 32, dtype=np.float32).reshape(16, 32), rows)
    index = jax.device_put(_aligned_index(np.random.default_rng(2), 16, 48, 8), rows)

    def hlo(groups):
        fn = jax.jit(lambda x, i: take_in_groups(x, i, groups), out_shardings=rows)
        with jax.set_mesh(mesh):
            return fn.lower(x, index).compile().as_text(), fn(x, index)

    plain, plain_out = hlo(1)
    grouped, grouped_out = hlo(8)
    assert "all-gather" in plain or "all-reduce" in plain  # the reason this module exists
    assert "all-gather" not in grouped and "all-reduce" not in grouped and "all-to-all" not in grouped
    np.testing.assert_array_equal(np.asarray(grouped_out), np.asarray(plain_out))


def test_fewer_groups_than_devices_are_not_forced_onto_one_device():
    """2 blocks on 8 devices (e.g. 2 processes of 4): not constrained to a replicated layout."""
    mesh = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    x = jax.device_put(np.arange(16 * 32, dtype=np.float32).reshape(16, 32), rows)
    index = _aligned_index(np.random.default_rng(3), 16, 48, 2)
    fn = jax.jit(lambda x, i: take_in_groups(x, i, 2), out_shardings=rows)
    with jax.set_mesh(mesh):
        text = fn.lower(x, jax.device_put(index, rows)).as_text()
        out = fn(x, jax.device_put(index, rows))
    assert "sharding_constraint" not in text  # a constraint here could only say "replicated"
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x)[index])
