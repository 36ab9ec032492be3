"""Orbax checkpoints: a step saved on one mesh restores onto others; latest-K plus best retention."""

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from pixellm_jax.config import MeshConfig, load_config
from pixellm_jax.mesh import make_mesh
from pixellm_jax.train.checkpoint import Checkpointer
from pixellm_jax.train.optimizer import make_optimizer
from pixellm_jax.train.state import TrainState, init_state, state_layout


def _host_state(cfg, tx):
    one = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    state, frozen = jax.device_get(init_state(cfg, one, tx)[1:])  # jitted: far faster than eager on CPU
    params, rngs = state.params, state.rngs
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(x.dtype), params)  # not the init values
    opt_state = jax.tree.map(lambda x: x + 1 if np.issubdtype(x.dtype, np.floating) else x, tx.init(params))
    return TrainState(np.int32(7), params, opt_state, rngs, np.int32(1), np.int32(2)), frozen


def test_a_checkpoint_saved_on_one_mesh_restores_onto_another(tmp_path):
    cfg = load_config("tiny")
    tx = make_optimizer(cfg.optim)
    state, frozen = _host_state(cfg, tx)
    saved_on = state_layout(cfg, make_mesh(MeshConfig(1, 8, 1)), tx)
    placed = jax.device_put((state, frozen), (saved_on.state_shardings, saved_on.frozen_shardings))
    assert placed[0].params["llm"]["lm_head"]["kernel"].get_value().sharding.spec == P("fsdp", "tensor")
    ck = Checkpointer(tmp_path, cfg.train)
    ck.save(7, *placed)
    ck.wait()
    for mesh in (MeshConfig(2, 2, 2), MeshConfig(1, 1, 1)):
        devices = jax.devices()[: mesh.data * mesh.fsdp * mesh.tensor]
        layout = state_layout(cfg, make_mesh(mesh, devices), tx)
        restored, restored_frozen = ck.restore(7, layout)
        jax.tree.map(np.testing.assert_array_equal, jax.device_get((restored, restored_frozen)), (state, frozen))
        kernel = restored.params["llm"]["lm_head"]["kernel"].get_value()
        assert kernel.sharding == layout.state_shardings.params["llm"]["lm_head"]["kernel"].get_value()
        assert len(kernel.sharding.device_set) == len(devices)
    ck.close()


def test_latest_k_and_the_best_by_eval_metric_are_kept(tmp_path):
    cfg = load_config("tiny", ["train.keep=2", "train.async_checkpointing=false"])
    scalar = lambda v: np.asarray(v, np.float32)  # noqa: E731
    ck = Checkpointer(tmp_path, cfg.train)
    giou = {2: 0.9, 4: 0.5, 6: None, 8: None}
    for step, value in giou.items():
        state = TrainState(np.int32(step), {"w": scalar(step)}, (), {}, np.int32(0), np.int32(0))
        ck.save(step, state, {"f": scalar(0)}, metrics=None if value is None else {"giou": value, "ciou": 0.0})
    ck.wait()
    assert ck.all_steps() == [2, 6, 8]  # the two latest and the best (step 2, gIoU 0.9)
    assert ck.best_step() == 2
    ck.close()
    assert Checkpointer(tmp_path, cfg.train).best_step() == 2  # the metrics are stored with the steps
