"""`copy_transformed`: the streamed transposes/casts equal the table's NumPy transform, banded or not."""

import ml_dtypes
import numpy as np
import pytest

from pixellm_jax.convert.stream import _BAND_BYTES, copy_transformed
from pixellm_jax.convert.tables import Permute

BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.mark.parametrize(
    "shape, perm, flip, src_dtype, dst_dtype",
    [
        ((1031, 700), (1, 0), (), BF16, BF16),  # banded transpose (1.4 MB), bands of uneven length
        ((1031, 700), (1, 0), (), np.float32, BF16),  # banded transpose with a cast
        ((9, 130, 517), (2, 0, 1), (), np.float32, np.float32),  # leading axis lands in the middle
        ((600, 1200), None, (), np.float32, BF16),  # banded cast only
        ((300, 900), (1, 0), (0,), np.float32, np.float32),  # flips take the unbanded path
        ((5, 7), (1, 0), (), BF16, np.float32),  # small: one copy
    ],
)
def test_copy_equals_the_numpy_transform(shape, perm, flip, src_dtype, dst_dtype, tmp_path):
    x = np.random.default_rng(0).standard_normal(shape, np.float32).astype(src_dtype)
    t = Permute("t", perm, flip)
    want = np.ascontiguousarray(t.forward(x).astype(dst_dtype))
    assert (x.nbytes >= 2 * _BAND_BYTES) == (x.size > 10_000)  # the cases above cover both paths
    dst = np.memmap(tmp_path / "buf.raw", dtype=dst_dtype, mode="w+", shape=want.shape)  # as fill_buffers
    copy_transformed(dst, x, t)
    np.testing.assert_array_equal(np.asarray(dst).view(np.uint8), want.view(np.uint8))
