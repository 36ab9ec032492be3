"""SAM building blocks against the segment-anything package, fp32, copied weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from pixellm_jax.models import sam_layers
from tests import sam_reference as ref

TOL = 1e-5


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def test_layer_norm_2d():
    theirs = ref.redraw_(ref.LayerNorm2d(8), seed=0)
    ours = ref.abstract(lambda: sam_layers.LayerNorm2d(8, rngs=nnx.Rngs(0)))
    ref.copy_into(theirs, ours)
    x = 3 * torch.randn(2, 8, 5, 6, generator=torch.Generator().manual_seed(1)) + 1
    assert _max_diff(ref.run(ours, jnp.asarray(ref.nhwc(x))), ref.nhwc(theirs(x))) <= TOL


def test_mlp():
    theirs = ref.redraw_(ref.MLP(8, 16, 5, 3), seed=0)
    ours = ref.abstract(lambda: sam_layers.MLP(8, 16, 5, 3, rngs=nnx.Rngs(0)))
    mapping = ref.copy_into(theirs, ours)
    assert mapping["layers.2.weight"] == "layers/2/kernel"
    x = torch.randn(3, 7, 8, generator=torch.Generator().manual_seed(1))
    assert _max_diff(ref.run(ours, jnp.asarray(x.numpy())), theirs(x).detach()) <= TOL


@pytest.mark.parametrize("h,w", [(4, 4), (3, 5)])
def test_dense_position_embedding(h, w):
    torch.manual_seed(0)
    theirs = ref.PositionEmbeddingRandom(8)
    ours = sam_layers.PositionEmbeddingRandom(8, rngs=nnx.Rngs(0))
    ref.copy_into(theirs, ours)
    expected = theirs((h, w)).permute(1, 2, 0).numpy()
    got = ours(h, w)
    assert got.shape == (h, w, 16)
    assert _max_diff(got, expected) <= TOL


def test_position_buffer_is_not_a_parameter():
    pe = sam_layers.PositionEmbeddingRandom(8, rngs=nnx.Rngs(0))
    assert not nnx.state(pe, nnx.Param)
    buffer = pe.positional_encoding_gaussian_matrix
    assert isinstance(buffer, sam_layers.Buffer) and buffer[...].shape == (2, 8)
    assert buffer.get_metadata()["out_sharding"] == (None, "decoder_embed")


def test_two_way_transformer():
    theirs = ref.redraw_(ref.TwoWayTransformer(depth=2, embedding_dim=16, num_heads=2, mlp_dim=32), seed=0)
    ours = ref.abstract(lambda: sam_layers.TwoWayTransformer(2, 16, 2, 32, 2, rngs=nnx.Rngs(0)))
    ref.copy_into(theirs, ours)
    g = torch.Generator().manual_seed(1)
    image = torch.randn(2, 16, 3, 5, generator=g)
    pe = torch.randn(1, 16, 3, 5, generator=g)
    tokens = torch.randn(2, 6, 16, generator=g)
    with torch.no_grad():
        q_ref, k_ref = theirs(image, pe.expand(2, -1, -1, -1), tokens)
    q, k = ref.run(ours, jnp.asarray(ref.nhwc(image)), jnp.asarray(ref.nhwc(pe)), jnp.asarray(tokens.numpy()))
    assert q.shape == (2, 6, 16) and k.shape == (2, 15, 16)
    assert _max_diff(q, q_ref) <= TOL
    assert _max_diff(k, k_ref) <= TOL


def _upscaling(cin, cout):
    return torch.nn.Sequential(torch.nn.ConvTranspose2d(cin, cout, 2, 2), ref.LayerNorm2d(cout), torch.nn.GELU())


def test_transposed_conv_upscaling():
    theirs = ref.redraw_(_upscaling(16, 4), seed=0)
    ours = ref.abstract(lambda: sam_layers.UpscaleBlock(16, 4, rngs=nnx.Rngs(0)))
    mapping = ref.copy_into(theirs, ours)
    assert mapping["0.weight"] == "layers/0/kernel" and mapping["1.weight"] == "layers/1/scale"
    x = torch.randn(2, 16, 3, 5, generator=torch.Generator().manual_seed(1))
    got = ref.run(ours, jnp.asarray(ref.nhwc(x)))
    assert got.shape == (2, 6, 10, 4)
    assert _max_diff(got, ref.nhwc(theirs(x))) <= TOL


def test_transposed_conv_kernel_needs_the_flip():
    """[in, out, kh, kw] -> [kh, kw, in, out] alone is wrong; the spatial flip is what makes it match."""
    conv = ref.redraw_(torch.nn.ConvTranspose2d(3, 5, 2, 2), seed=0)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    expected = ref.nhwc(conv(x))
    ours = ref.abstract(lambda: sam_layers.UpscaleBlock(3, 5, rngs=nnx.Rngs(0))).layers[0]
    weight = conv.weight.detach().numpy().transpose(2, 3, 0, 1)
    ours.bias.set_value(jnp.asarray(conv.bias.detach().numpy()))
    ours.kernel.set_value(jnp.asarray(weight))
    assert _max_diff(ref.run(ours, jnp.asarray(ref.nhwc(x))), expected) > 1e-2
    ours.kernel.set_value(jnp.asarray(weight[::-1, ::-1].copy()))
    assert _max_diff(ref.run(ours, jnp.asarray(ref.nhwc(x))), expected) <= TOL


def test_block_conv_transpose_equals_the_convolution():
    ours = sam_layers.BlockConvTranspose(6, 5, (2, 2), (2, 2), padding="VALID", rngs=nnx.Rngs(0))
    conv = nnx.ConvTranspose(6, 5, (2, 2), (2, 2), padding="VALID", rngs=nnx.Rngs(0))
    conv.bias[...] = jax.random.normal(jax.random.key(2), (5,))
    ours.bias[...] = conv.bias[...]
    x = jax.random.normal(jax.random.key(1), (2, 3, 4, 6))
    np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(conv(x)), atol=1e-6)
    with pytest.raises(ValueError, match="strides equal to the kernel size"):
        sam_layers.BlockConvTranspose(6, 5, (2, 2), (1, 1), padding="VALID", rngs=nnx.Rngs(0))(x)
