"""The row tail (kernels/row_tail.py): the next add_rms_norm (+ router) run by the last program of a decode projection
— the dense GEMV (out_proj; plain and split-K launches, batch 1 and several rows) and the expert fc2 GEMV (batch-1
top-1; other paths run it as its own launch) — against the projection's reference followed by add_rms_norm_ref
(+ route_ref on the normed rows through an fp32 router). Twice in a row, so a counter left non-zero would show."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import DTYPES, full, make_gen, randn, small

from mambadeploy.kernels.gemv import gemv, gemv_ref
from mambadeploy.kernels.moe_experts import expert_gather, expert_gather_ref
from mambadeploy.kernels.moe_routing import route_ref
from mambadeploy.kernels.rms_norm import add_rms_norm_ref
from mambadeploy.validate.tolerances import assert_close_op

ROUTERS = [None, ("sigmoid_top1", 1), ("softmax_topk", 2)]


def _check_tail(y, normed, route_w, route_e, residual_before, residual_after, norm_w, router, dtype):
    out_ref, res_ref = add_rms_norm_ref(y, residual_before, norm_w, 1e-5)
    assert_close_op(residual_after, res_ref, torch.float32, what="residual")
    assert_close_op(normed, out_ref, dtype, what="normed")
    if router is None:
        assert route_w is None and route_e is None
        return
    rw, rb, kind, k = router
    w_ref, e_ref = route_ref(F.linear(normed.float(), rw.float(), None if rb is None else rb.float()), kind, k)
    assert torch.equal(route_e, e_ref)
    assert_close_op(route_w, w_ref, torch.float32, what="route weights")


def _router(g, spec, E, d, dtype):
    if spec is None:
        return None
    kind, k = spec
    return randn(g, E, d, dtype=dtype, scale=d ** -0.5), randn(g, E, dtype=dtype), kind, k


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("route", ROUTERS, ids=str)
@pytest.mark.parametrize("M,N,K", small((1, 40, 72), (3, 37, 150)) + full((1, 1472, 2944), (8, 1472, 2944)))
def test_gemv_tail_matches_projection_then_norm(M, N, K, route, dtype):
    """out_proj with the next norm (+ router) in its last program (the interpreter's launch splits K: split-K path)."""
    g = make_gen(21)
    x, w, norm_w = randn(g, M, K, dtype=dtype), randn(g, N, K, dtype=dtype, scale=K ** -0.5), randn(g, N, dtype=dtype)
    router = _router(g, route, 5, N, dtype)
    residual = randn(g, M, N)
    for _ in range(2):
        before = residual.clone()
        tail = {"residual": residual, "weight": norm_w, "eps": 1e-5}
        if router is not None:
            tail["router"] = router
        y, normed, route_w, route_e = gemv(x, w, tail=tail)
        assert_close_op(y, gemv_ref(x, w), dtype, what="y")
        _check_tail(y, normed, route_w, route_e, before, residual, norm_w, router, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("route", ROUTERS, ids=str)
@pytest.mark.parametrize("T,d,F_", small((1, 40, 24), (3, 24, 40)) + full((1, 1472, 3872)))
def test_expert_gather_tail_matches_ffn_then_norm(T, d, F_, route, dtype):
    """The expert fc2 with the next norm (+ router): in fc2's last program for one pair, as its own launch above."""
    g = make_gen(22)
    E = 4
    x, norm_w = randn(g, T, d, dtype=dtype), randn(g, d, dtype=dtype)
    w1 = randn(g, E, 2 * F_, d, dtype=dtype, scale=d ** -0.5)
    w2 = randn(g, E, d, F_, dtype=dtype, scale=F_ ** -0.5)
    weights, experts = route_ref(randn(g, T, E, scale=2.0), "sigmoid_top1", 1)
    router = _router(g, route, 5, d, dtype)
    residual = randn(g, T, d)
    for _ in range(2):
        before = residual.clone()
        tail = {"residual": residual, "weight": norm_w, "eps": 1e-5}
        if router is not None:
            tail["router"] = router
        y, normed, route_w, route_e = expert_gather(x, w1, w2, experts, weights, "gelu", tail=tail)
        assert_close_op(y, expert_gather_ref(x, w1, w2, experts, weights, "gelu"), dtype, what="y")
        _check_tail(y, normed, route_w, route_e, before, residual, norm_w, router, dtype)


def test_tail_refuses_a_residual_that_does_not_fit():
    g = make_gen(23)
    x, w = randn(g, 1, 72), randn(g, 40, 72)
    with pytest.raises(ValueError, match="residual"):
        gemv(x, w, tail={"residual": randn(g, 1, 41), "weight": randn(g, 40), "eps": 1e-5})
