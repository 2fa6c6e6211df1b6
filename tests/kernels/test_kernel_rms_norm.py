"""add_rms_norm / rms_norm (Triton) vs their references, including the in-place residual update."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DTYPES, full, make_gen, randn, small

from mambadeploy.kernels.rms_norm import (
    add_rms_norm,
    add_rms_norm_ref,
    embed_rms_norm,
    final_norm,
    final_norm_ref,
    rms_norm,
    rms_norm_ref,
)
from mambadeploy.validate.tolerances import op_checker

check_op = op_checker("rms_norm")  # fp32 on the CPU: this op's measured bound

SHAPES = small(((1, 40),), ((3, 7, 72),), ((154, 24),)) + full(
    ((1, 1472),), ((64, 1472),), ((2048, 1152),), ((3, 33, 2944),))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_add_rms_norm_matches_ref(shape, dtype):
    g = make_gen()
    x, res, w = randn(g, *shape, dtype=dtype), randn(g, *shape), randn(g, shape[-1], dtype=dtype)
    out_ref, res_ref = add_rms_norm_ref(x, res, w, 1e-5)
    out, new_res = add_rms_norm(x, res, w, 1e-5)
    check_op(out, out_ref, dtype, what="normed")
    check_op(new_res, res_ref, torch.float32, what="residual")
    out2, same = add_rms_norm(x, res, w, 1e-5, residual_out=res)  # in place
    assert same is res
    check_op(res, res_ref, torch.float32, what="residual in place")
    check_op(out2, out_ref, dtype, what="normed (in place)")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_matches_ref(dtype):
    g = make_gen(1)
    base = randn(g, 3, 33, 40, dtype=dtype)
    x = base[..., 3:27]  # a strided view of rows, as the Jamba dt/B/C slices are
    w = randn(g, 24, dtype=dtype)
    check_op(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), dtype, what="rms_norm")
    out = rms_norm(x.float(), w, 1e-6, out_dtype=dtype)  # fp32 residual in, model dtype out
    assert out.dtype == dtype
    check_op(out, rms_norm_ref(x.float(), w, 1e-6).to(dtype), dtype, what="rms_norm fp32 -> dtype")


def test_shape_mismatch_is_refused():
    g = make_gen()
    with pytest.raises(ValueError, match="differ"):
        add_rms_norm(randn(g, 2, 8), randn(g, 3, 8), randn(g, 8), 1e-5)


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_final_norm_matches_ref(shape, dtype, kind):
    """The head's norm: (residual + x) rounded to the model dtype, then LayerNorm (BlackMamba) or RMSNorm; the
    residual is left as it was."""
    g = make_gen(5)
    x, res = randn(g, *shape, dtype=dtype), randn(g, *shape, scale=3.0)
    w, b = randn(g, shape[-1], dtype=dtype), randn(g, shape[-1], dtype=dtype)
    before = res.clone()
    out = final_norm(x, res, w, b, 1e-5, kind)
    assert out.dtype == dtype
    check_op(out, final_norm_ref(x, res, w, b, 1e-5, kind), dtype, what=f"final {kind}")
    torch.testing.assert_close(res, before, rtol=0, atol=0)


def test_final_norm_refuses_what_it_cannot_compute():
    g = make_gen()
    x, res, w = randn(g, 2, 8), randn(g, 2, 8), randn(g, 8)
    with pytest.raises(ValueError, match="bias"):
        final_norm(x, res, w, None, 1e-5, "layernorm")
    with pytest.raises(ValueError, match="kind"):
        final_norm(x, res, w, None, 1e-5, "batchnorm")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,V,d", small((1, 50, 40), (3, 97, 72)) + full((1, 50304, 1472), (8, 50304, 2560)))
def test_embed_rms_norm_matches_ref(T, V, d, dtype):
    """The first block's norm from token ids: the residual stream starts as the widened rows, the output is its norm."""
    g = make_gen(7)
    table, w = randn(g, V, d, dtype=dtype), randn(g, d, dtype=dtype)
    ids = torch.randint(0, V, (T,), generator=g, device=table.device)
    residual = torch.full((T, d), float("nan"), device=table.device)
    out = embed_rms_norm(ids, table, w, 1e-5, residual_out=residual)
    torch.testing.assert_close(residual, table[ids].float(), rtol=0, atol=0)
    check_op(out, rms_norm_ref(table[ids].float(), w, 1e-5).to(dtype), dtype, what="embed + norm")


def test_embed_rms_norm_refuses_a_bad_residual_buffer():
    table, w, ids = torch.randn(10, 8), torch.randn(8), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="residual_out"):
        embed_rms_norm(ids, table, w, 1e-5, residual_out=torch.empty(2, 8, dtype=torch.float16))
