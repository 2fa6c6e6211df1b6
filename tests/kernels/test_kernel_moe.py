"""MoE kernels vs their references: routing (sigmoid-top1, softmax-top1, softmax-topk; logits in or fused router GEMV),
the expert grouping, and the expert FFN on both launch shapes (GEMV for few pairs, grouped GEMM above)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import DEVICE, DTYPES, full, make_gen, randn, small

from mambadeploy.kernels.common import ACTIVATION_CODES
from mambadeploy.kernels.moe_experts import (
    GEMV_MAX_PAIRS,
    expert_gather,
    expert_gather_ref,
    launch_config,
    tma_usable,
)
from mambadeploy.kernels.moe_routing import add_rms_norm_route, moe_align, route, route_hidden, route_ref
from mambadeploy.kernels.rms_norm import add_rms_norm_ref, rms_norm_ref
from mambadeploy.opset import ACTIVATION_CODES as OPSET_CODES
from mambadeploy.validate.tolerances import op_checker

check_op = op_checker("moe")  # fp32 on the CPU: this op's measured bound

ROUTERS = [("sigmoid_top1", 1), ("softmax_topk", 1), ("softmax_topk", 2)]


@pytest.mark.parametrize("router,k", ROUTERS, ids=lambda v: str(v))
@pytest.mark.parametrize("T,E", small((1, 4), (7, 5), (154, 16)) + full((2048, 8), (64, 16)))
def test_route_matches_ref(T, E, router, k):
    g = make_gen()
    logits = randn(g, T, E, scale=2.0)
    w, e = route(logits, router, k)
    w_ref, e_ref = route_ref(logits, router, k)
    assert e.dtype == torch.int64 and torch.equal(e, e_ref)
    check_op(w, w_ref, torch.float32, what="weights")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("router,k", ROUTERS, ids=lambda v: str(v))
@pytest.mark.parametrize("T,d,E", small((1, 40, 4), (33, 72, 5)) + full((1, 1472, 8), (2048, 1152, 8)))
def test_route_hidden_matches_ref(T, d, E, router, k, dtype):
    g = make_gen(1)
    x, w, b = randn(g, T, d, dtype=dtype), randn(g, E, d, dtype=dtype, scale=d ** -0.5), randn(g, E, dtype=dtype)
    weights, experts = route_hidden(x, w, b, router, k)
    w_ref, e_ref = route_ref(F.linear(x.float(), w.float(), b.float()), router, k)  # fp32 logits, as fused
    assert torch.equal(experts, e_ref)
    check_op(weights, w_ref, torch.float32, what="weights")


@pytest.mark.parametrize("P,E,block_m", [(1, 4, 16), (37, 5, 16), (300, 8, 64)])
def test_align_groups_pairs_by_expert(P, E, block_m):
    g = make_gen(2)
    experts = torch.randint(0, E, (P,), generator=g, device=g.device)
    sorted_pairs, block_expert = moe_align(experts, E, block_m)
    sorted_pairs, block_expert, experts = sorted_pairs.cpu(), block_expert.cpu(), experts.cpu()
    real = sorted_pairs[sorted_pairs < P]
    assert sorted(real.tolist()) == list(range(P))  # every pair exactly once
    for blk, e in enumerate(block_expert.tolist()):
        rows = sorted_pairs[blk * block_m:(blk + 1) * block_m]
        rows = rows[rows < P]
        if e >= E:
            assert rows.numel() == 0
        else:
            assert rows.numel() > 0 and bool((experts[rows] == e).all())
            assert rows.tolist() == sorted(rows.tolist())  # stable order inside an expert


# (T, d, F, E, k, activation): T * k <= GEMV_MAX_PAIRS (batch-1 top-1) takes the GEMV launch, above the grouped GEMM
MOE_CASES = small((1, 40, 24, 4, 1, "gelu"), (3, 40, 24, 4, 2, "silu"), (7, 24, 40, 5, 1, "gelu_tanh"),
                  (33, 40, 24, 4, 1, "gelu"), (154, 24, 40, 5, 2, "silu")) + full(
    (1, 1472, 3872, 8, 1, "gelu"), (8, 1472, 3872, 8, 1, "gelu"), (64, 1472, 3872, 8, 1, "gelu"),
    (2048, 1152, 3072, 8, 1, "gelu"), (33, 1024, 1000, 16, 2, "silu"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,d,Fs,E,k,activation", MOE_CASES)
def test_expert_gather_matches_ref(T, d, Fs, E, k, activation, dtype):
    g = make_gen(3)
    x = randn(g, T, d, dtype=dtype)
    w1 = randn(g, E, 2 * Fs, d, dtype=dtype, scale=d ** -0.5)
    w2 = randn(g, E, d, Fs, dtype=dtype, scale=Fs ** -0.5)
    router = "softmax_topk" if k > 1 else "sigmoid_top1"
    weights, experts = route_ref(randn(g, T, E, scale=2.0), router, k)
    path = launch_config((x.shape, w1.shape, w2.shape, experts.shape, weights.shape), (dtype,),
                         tma=tma_usable(x, w1, w2))["path"]
    assert path == ("gemv" if T * k <= GEMV_MAX_PAIRS else "gemm_tma" if T * k > 16 * E and tma_usable(x, w1, w2)
                    else "gemm")
    y = expert_gather(x, w1, w2, experts, weights, activation)
    check_op(y, expert_gather_ref(x, w1, w2, experts, weights, activation), dtype, what=f"y ({path})")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,d,Fs,E,k,activation", small((33, 40, 24, 4, 1, "gelu"), (154, 24, 40, 5, 2, "silu"))
                         + full((2048, 1472, 3872, 8, 1, "gelu"), (300, 1024, 1000, 16, 2, "silu")))
def test_expert_gather_tma_path_matches_ref(T, d, Fs, E, k, activation, dtype):
    """The grouped GEMM with TMA tiles (what Hopper runs in prefill), forced by its config so that the interpreter
    covers it too: tiles that run past an expert's rows or the matrix end, padding rows, top-k > 1."""
    if DEVICE == "cuda" and dtype == torch.float32:
        pytest.skip("on a GPU the TMA path serves 16-bit operands only (tma_usable); fp32 takes the pointer path")
    g = make_gen(5)
    x = randn(g, T, d, dtype=dtype)
    w1 = randn(g, E, 2 * Fs, d, dtype=dtype, scale=d ** -0.5)
    w2 = randn(g, E, d, Fs, dtype=dtype, scale=Fs ** -0.5)
    weights, experts = route_ref(randn(g, T, E, scale=2.0), "softmax_topk" if k > 1 else "sigmoid_top1", k)
    cfg = launch_config((x.shape, w1.shape, w2.shape, experts.shape, weights.shape), (dtype,),
                        interpret=not x.is_cuda)
    cfg["path"] = "gemm_tma"
    y = expert_gather(x, w1, w2, experts, weights, activation, config=cfg)
    check_op(y, expert_gather_ref(x, w1, w2, experts, weights, activation), dtype, what="y (gemm_tma)")
    if DEVICE == "cuda":
        with pytest.raises(ValueError, match="16-bit"):
            expert_gather(x.float(), w1.float(), w2.float(), experts, weights, activation, config=cfg)


def test_activation_codes_agree_with_the_opset():
    assert ACTIVATION_CODES == OPSET_CODES


def test_bad_router_is_refused():
    with pytest.raises(ValueError, match="top-1"):
        route(torch.zeros(2, 4), "sigmoid_top1", 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("router,k", ROUTERS, ids=lambda v: str(v))
@pytest.mark.parametrize("T,d,E", small((1, 40, 4), (7, 72, 5)) + full((1, 1472, 8), (64, 1152, 8), (3, 1472, 16)))
def test_add_rms_norm_route_matches_ref(T, d, E, router, k, dtype):
    """Fused residual add + RMSNorm + router: the norm as add_rms_norm_ref, the route as route_ref on the normed rows
    (in the model dtype) through an fp32 router."""
    g = make_gen(4)
    x, res, w = randn(g, T, d, dtype=dtype), randn(g, T, d), randn(g, d, dtype=dtype)
    rw, rb = randn(g, E, d, dtype=dtype, scale=d ** -0.5), randn(g, E, dtype=dtype)
    out_ref, res_ref = add_rms_norm_ref(x, res, w, 1e-5)
    out, new_res, weights, experts = add_rms_norm_route(x, res, w, 1e-5, rw, rb, router, k)
    check_op(out, out_ref, dtype, what="normed")
    check_op(new_res, res_ref, torch.float32, what="residual")
    w_ref, e_ref = route_ref(F.linear(out.float(), rw.float(), rb.float()), router, k)
    assert torch.equal(experts, e_ref)
    check_op(weights, w_ref, torch.float32, what="weights")
    out2, same, _, e2 = add_rms_norm_route(None, res, w, 1e-5, rw, None, router, k)  # norm of the residual alone
    assert same is res
    check_op(out2, rms_norm_ref(res, w, 1e-5).to(dtype), dtype, what="normed (no add)")
    assert torch.equal(e2, route_ref(F.linear(out2.float(), rw.float()), router, k)[1])
