"""add_rms_norm / rms_norm (Triton) vs their references, including the in-place residual update."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DTYPES, full, make_gen, randn, small

from mambadeploy.kernels.rms_norm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref
from mambadeploy.validate.tolerances import assert_close_op

SHAPES = small(((1, 40),), ((3, 7, 72),), ((154, 24),)) + full(
    ((1, 1472),), ((64, 1472),), ((2048, 1152),), ((3, 33, 2944),))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_add_rms_norm_matches_ref(shape, dtype):
    g = make_gen()
    x, res, w = randn(g, *shape, dtype=dtype), randn(g, *shape), randn(g, shape[-1], dtype=dtype)
    out_ref, res_ref = add_rms_norm_ref(x, res, w, 1e-5)
    out, new_res = add_rms_norm(x, res, w, 1e-5)
    assert_close_op(out, out_ref, dtype, what="normed")
    assert_close_op(new_res, res_ref, torch.float32, what="residual")
    out2, same = add_rms_norm(x, res, w, 1e-5, residual_out=res)  # in place
    assert same is res
    assert_close_op(res, res_ref, torch.float32, what="residual in place")
    assert_close_op(out2, out_ref, dtype, what="normed (in place)")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_matches_ref(dtype):
    g = make_gen(1)
    base = randn(g, 3, 33, 40, dtype=dtype)
    x = base[..., 3:27]  # a strided view of rows, as the Jamba dt/B/C slices are
    w = randn(g, 24, dtype=dtype)
    assert_close_op(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), dtype, what="rms_norm")
    out = rms_norm(x.float(), w, 1e-6, out_dtype=dtype)  # fp32 residual in, model dtype out
    assert out.dtype == dtype
    assert_close_op(out, rms_norm_ref(x.float(), w, 1e-6).to(dtype), dtype, what="rms_norm fp32 -> dtype")


def test_shape_mismatch_is_refused():
    g = make_gen()
    with pytest.raises(ValueError, match="differ"):
        add_rms_norm(randn(g, 2, 8), randn(g, 3, 8), randn(g, 8), 1e-5)
