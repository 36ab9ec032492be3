"""Smoke test of the train-step benchmark: both sides train the same model on the same batch."""

import numpy as np
import pytest
from flax import nnx

from tests.tools._load import load_tool

bench = load_tool("bench_train_step")
FAST_CODEGEN = load_tool("scale_plan").FAST_CODEGEN  # LLVM -O0: a faster compile, the same numerics


@pytest.fixture(scope="module")
def setup():
    cfg = bench.bench_config(hidden=64, layers=1, intermediate=128, vocab=256, vision_hidden=64, vision_layers=2,
                             image_size=56, max_targets=2)
    batch = bench.make_batch(cfg, images=2, convs_per_image=1, text_len=40)
    return cfg, batch


def test_batch_schema(setup):
    cfg, batch = setup
    seg = set(cfg.model.head.seg_ids(cfg.model.text.vocab_size))
    assert batch["pixels"].shape == (2, 56, 56, 3) and batch["masks"].shape == (2, 2, 56, 56)
    for row in batch["input_ids"]:
        assert sum(int(t) in seg for t in row) == 2 * len(seg)  # max_targets complete codebook groups
    assert batch["masks"].any(axis=(2, 3)).all() and batch["mask_valid"].all()


def test_jax_step_matches_the_pytorch_reference(setup):
    cfg, batch = setup
    torch_model, torch_step = bench.build_torch_reference(cfg)
    model = nnx.eval_shape(lambda: bench.build_pixellm(cfg.model, cfg.seed))
    bench.copy_torch_into(torch_model, model)
    out = bench.run_jax_side(cfg, batch, steps=2, model=model, compiler_options=FAST_CODEGEN)
    torch_inputs = bench.torch_inputs(batch)
    torch_losses = [torch_step(torch_inputs) for _ in range(2)]

    n_torch = sum(p.numel() for n, p in torch_model.named_parameters() if "post_layernorm" not in n)
    assert out["params"] == n_torch
    assert out["trainable"] == sum(p.numel() for p in torch_model.parameters() if p.requires_grad)
    assert out["flops"] > 0 and out["compile_s"] > 0 and len(out["times"]) == 2
    # Same loss before and after one AdamW update: same weights, same function, same optimizer.
    np.testing.assert_allclose(out["losses"], torch_losses, rtol=2e-5)
    assert out["losses"][1] < out["losses"][0]


def test_op_times_sums_the_traced_ops_by_kind(tmp_path):
    import re

    import jax
    import jax.numpy as jnp

    x = jnp.ones((512, 512))
    f = jax.jit(lambda a: jnp.tanh(a @ a) @ a)
    f(x).block_until_ready()
    times = bench.op_times(lambda: f(x).block_until_ready(), str(tmp_path))
    kinds = [k for k, _, _ in times]
    assert all(t > 0 for _, t, _ in times) and len(set(kinds)) == len(kinds)
    assert not any(re.search(r"\.\d+$", k) for k in kinds)  # numeric suffixes folded into the kind
    assert sum(n for _, _, n in times) >= 2  # at least the two products ran as traced ops
