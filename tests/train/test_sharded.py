"""On 8 simulated devices, loss and gradients of sharded runs equal the single-device run."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from pixellm_jax.config import MeshConfig, load_config
from pixellm_jax.describe import random_batch
from pixellm_jax.mesh import make_mesh
from pixellm_jax.train.mesh import batch_groups, batch_shardings, global_batch
from pixellm_jax.train.optimizer import make_optimizer
from pixellm_jax.train.state import init_state, state_layout
from pixellm_jax.train.step import loss_and_grads, make_train_step

MESHES = {"fsdp8": MeshConfig(data=1, fsdp=8, tensor=1), "data2_fsdp2_tensor2": MeshConfig(data=2, fsdp=2, tensor=2)}
ROWS = 8  # images and conversations: divisible by data x fsdp, so the batch is really split


@pytest.fixture(scope="module")
def setup():
    """The tiny config (official trainable set, fp32), its state on the host, a batch, the reference."""
    cfg = load_config("tiny", ["model.lora.dropout=0.0"])
    tx = make_optimizer(cfg.optim)
    one = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    state, frozen = jax.device_get(init_state(cfg, one, tx)[1:])  # on the host, placed per mesh below
    batch = random_batch(cfg, conversations=ROWS, length=24)
    batch["masks"][:, 0] = np.random.default_rng(1).random(batch["masks"].shape[:1] + batch["masks"].shape[2:]) < 0.4
    reference = _loss_and_grads(cfg, tx, one, state, frozen, batch)
    return cfg, tx, state, frozen, batch, reference


def _loss_and_grads(cfg, tx, mesh, state, frozen, batch, image_groups=1):
    layout = state_layout(cfg, mesh, tx)
    state = jax.device_put(state, layout.state_shardings)
    frozen = jax.device_put(frozen, layout.frozen_shardings)
    placed = global_batch(batch, batch_shardings(mesh, ROWS, ROWS))
    fn = jax.jit(lambda s, f, b: loss_and_grads(layout.graphdef, s, f, b, cfg, image_groups))
    (loss, metrics, _), grads = fn(state, frozen, placed)
    return loss, metrics, grads


# (mesh, image groups): the batch (conversation j about image j) is aligned to any block count; the
# trainer packs one block per device of the batch split (8 for fsdp8, 4 for data2 x fsdp2).
CASES = [("fsdp8", 1), ("fsdp8", 8), ("data2_fsdp2_tensor2", 4)]


@pytest.mark.parametrize("name,image_groups", CASES)
def test_loss_and_gradients_equal_the_single_device_run(setup, name, image_groups):
    cfg, tx, state, frozen, batch, (loss1, metrics1, grads1) = setup
    mesh = make_mesh(MESHES[name])
    assert batch_groups(mesh, ROWS, ROWS)[1] == max(g for n, g in CASES if n == name)  # what the trainer uses
    loss, metrics, grads = _loss_and_grads(cfg, tx, mesh, state, frozen, batch, image_groups)
    assert float(metrics1["num_masks"]) == ROWS and float(metrics1["dice"]) > 0  # the mask terms are live
    np.testing.assert_allclose(float(loss), float(loss1), rtol=1e-5)
    for k in ("ce", "bce", "dice"):
        np.testing.assert_allclose(float(metrics[k]), float(metrics1[k]), rtol=1e-5, atol=1e-6)
    flat1 = dict(jax.tree_util.tree_flatten_with_path(grads1)[0])
    flat = dict(jax.tree_util.tree_flatten_with_path(grads)[0])
    assert flat.keys() == flat1.keys()
    for path, g in flat.items():
        np.testing.assert_allclose(np.asarray(g), np.asarray(flat1[path]), rtol=1e-4, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))
    # Gradients exist only for trainable parameters, and they live sharded like their parameters.
    assert "vision_tower" not in grads and "image_feature_neck" not in grads
    layer_grads = [jax.tree_util.keystr(p) for p in flat if jax.tree_util.keystr(p).startswith("['llm']['layers']")]
    assert layer_grads and all("lora_a" in p or "lora_b" in p for p in layer_grads)  # base weights frozen
    lm_head = grads["llm"]["lm_head"]["kernel"].get_value()
    assert lm_head.sharding.is_equivalent_to(NamedSharding(mesh, P("fsdp", "tensor")), 2)
    assert any(np.abs(np.asarray(g)).max() > 0 for g in flat.values())


def test_the_train_step_applies_the_models_activation_constraints(setup):
    cfg, tx, state, frozen, batch, _ = setup
    mesh = make_mesh(MESHES["fsdp8"])
    layout = state_layout(cfg, mesh, tx)
    shardings = batch_shardings(mesh, ROWS, ROWS)
    step = make_train_step(layout, cfg, tx, mesh, shardings)
    abstract = lambda tree, sh: jax.tree.map(  # noqa: E731
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=s), tree, sh)
    batch_in = {k: jax.ShapeDtypeStruct(batch[k].shape, batch[k].dtype, sharding=shardings[k]) for k in shardings}
    text = step.lower(abstract(state, layout.state_shardings), abstract(frozen, layout.frozen_shardings),
                      batch_in).as_text()
    # the LLM hidden states at each layer boundary, batch split over data x fsdp
    assert text.count("sharding_constraint") + text.count("@Sharding") >= 2 * cfg.model.text.num_layers
