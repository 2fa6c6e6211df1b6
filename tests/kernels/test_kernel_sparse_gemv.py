"""SCAP sparse GEMV (in-kernel compaction of the kept features + a GEMV over only their weight rows, chunks added
deterministically) vs its fp32 reference: batch 1..4, widths off every block multiple, with and without the folded
bias, thresholds that keep everything / half / 1 % / nothing, a batch row that keeps nothing; the MoE expert variant
with per-pair experts; the fused decode conv; the predicated (non-compacting) loop of the speed sweep; and both against
the reference model's own sparse linear (F.linear(sparsify_ref(x), W, b'))."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import DTYPES, full, make_gen, randn, small

from mambadeploy.kernels.sparse_gemv import (
    launch_config,
    sparse_expert_gemv,
    sparse_expert_gemv_ref,
    sparse_gemv,
    sparse_gemv_ref,
)
from mambadeploy.models.ref_ops import causal_conv1d_update_ref
from mambadeploy.models.sparsity import sparsify_ref
from mambadeploy.validate.tolerances import op_checker

check_op = op_checker("sparse_gemv")  # fp32 on the CPU: this op's measured bound


def _threshold_for(x, mode, sparsity):
    """The threshold that drops `sparsity` of |x - mode| (-1: keep all; 1e9: drop all)."""
    if sparsity <= 0:
        return -1.0
    if sparsity >= 1:
        return 1e9
    return float(torch.quantile((x.float() - mode).abs().flatten().cpu(), sparsity))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# full (GPU only): BlackMamba-2.8B in_proj, x_proj, out_proj at batch 1 and 4
@pytest.mark.parametrize("B,N,K", small((1, 40, 72), (3, 37, 50), (4, 5, 33), (2, 70, 31), (1, 33, 97)) + full(
    (1, 5888, 1472), (4, 5888, 1472), (1, 124, 2944), (1, 1472, 2944), (4, 1472, 2944)))
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99, 1.0], ids=["keep-all", "half", "1pc-kept", "drop-all"])
def test_sparse_gemv_matches_ref(B, N, K, sparsity, dtype):
    g = make_gen()
    x = randn(g, B, K, dtype=dtype)
    wt = randn(g, K, N, dtype=dtype, scale=K ** -0.5)
    bias = randn(g, N, dtype=dtype) if N % 2 == 0 else None
    mode = 0.1
    threshold = _threshold_for(x, mode, sparsity)
    y = sparse_gemv(x, wt, mode, threshold, bias)
    ref = sparse_gemv_ref(x, wt, mode, threshold, bias)
    assert y.shape == (B, N) and y.dtype == dtype
    check_op(y, ref, dtype, what=f"sparse_gemv {B}x{N}x{K} sparsity {sparsity}")
    if sparsity >= 1:  # nothing kept: exactly the bias (or zeros), no weight read
        assert torch.equal(y, (bias if bias is not None else torch.zeros(N, dtype=dtype)).expand(B, N).to(y.device))


@pytest.mark.parametrize("B", [2, 4])
def test_a_row_that_keeps_nothing_gets_only_the_bias(B):
    """Rows share the weight rows that any of them keeps; a row whose every entry sits at the mode must still get
    exactly its bias (its zeros times the shared rows), the others their sums."""
    g = make_gen(5)
    K, N, mode = 45, 38, 0.25
    x = randn(g, B, K, dtype=torch.bfloat16)
    x[1] = mode  # |x - m| = 0 <= t everywhere
    wt, bias = randn(g, K, N, dtype=torch.bfloat16, scale=0.2), randn(g, N, dtype=torch.bfloat16)
    y = sparse_gemv(x, wt, mode, 0.3, bias)
    check_op(y, sparse_gemv_ref(x, wt, mode, 0.3, bias), torch.bfloat16, what="row 1 all dropped")
    assert torch.equal(y[1], bias)


def test_sparse_gemv_equals_the_reference_models_sparse_linear():
    g = make_gen(7)
    x, w, b = randn(g, 2, 45), randn(g, 29, 45, scale=45 ** -0.5), randn(g, 29)
    mode, threshold = -0.2, 0.5
    expected = F.linear(sparsify_ref(x, mode, threshold), w, b)
    check_op(sparse_gemv(x, w.t().contiguous(), mode, threshold, b), expected, torch.float32,
             what="kernel vs model's sparse linear")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("P,E,N,K", small((1, 4, 24, 40), (4, 3, 33, 17), (6, 8, 16, 64), (3, 2, 70, 75)) + full(
    (1, 8, 7744, 1472), (4, 8, 1472, 3872)))  # 2.8B expert fc1, fc2
def test_sparse_expert_gemv_matches_ref(P, E, N, K, dtype):
    g = make_gen(3)
    x = randn(g, P, K, dtype=dtype)
    wt = randn(g, E, K, N, dtype=dtype, scale=K ** -0.5)
    experts = torch.randint(0, E, (P,), generator=g, device=g.device)
    bias = randn(g, E, N, dtype=dtype) if P % 2 == 0 else None
    y = sparse_expert_gemv(x, wt, experts, 0.05, 0.5, bias)
    check_op(y, sparse_expert_gemv_ref(x, wt, experts, 0.05, 0.5, bias), dtype,
             what=f"sparse_expert_gemv P={P} E={E} {N}x{K}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("P,E,F,K,activation", [(1, 4, 24, 20, "gelu"), (4, 3, 21, 70, "silu"),
                                                (3, 2, 9, 45, "gelu_tanh")])
def test_expert_epilogues_gated_activation_and_routing_scale(P, E, F, K, activation, dtype):
    """fc1 with act(gate) * up in its epilogue (both halves of a column tile in one program; one chunk and several,
    the up partials beside the gate's) and fc2 scaled by each pair's routing weight: equal to the reference MoE's
    separate ops (sparse_expert_gemv_ref with the same options)."""
    g = make_gen(13)
    x = randn(g, P, K, dtype=dtype)
    wt1, b1 = randn(g, E, K, 2 * F, dtype=dtype, scale=K ** -0.5), randn(g, E, 2 * F, dtype=dtype)
    wt2 = randn(g, E, F, K, dtype=dtype, scale=F ** -0.5)
    experts = torch.randint(0, E, (P,), generator=g, device=g.device)
    weights = torch.rand(P, generator=g, device=g.device)
    a_ref = sparse_expert_gemv_ref(x, wt1, experts, 0.05, 0.3, b1, activation=activation)
    for use_dot in (False, True):
        cfg = launch_config(K, F, 1, P, interpreted=True, use_dot=use_dot)
        a = sparse_expert_gemv(x, wt1, experts, 0.05, 0.3, b1, activation=activation, config=cfg)
        assert a.shape == (P, F)
        check_op(a, a_ref, dtype, what=f"fc1 + {activation}, tl.dot {use_dot}")
    y = sparse_expert_gemv(a, wt2, experts, 0.0, 0.1, scale=weights)
    check_op(y, sparse_expert_gemv_ref(a, wt2, experts, 0.0, 0.1, scale=weights), dtype, what="fc2 x routing weight")
    with pytest.raises(ValueError, match="gated activation"):
        sparse_expert_gemv(x, wt1, experts, 0.0, 0.1, activation="relu6")


def test_shape_errors():
    x = torch.zeros(5, 8)
    with pytest.raises(ValueError, match="batch 5"):
        sparse_gemv(x, torch.zeros(8, 3), 0.0, 0.1)
    with pytest.raises(ValueError, match="do not fit"):
        sparse_gemv(x[:2], torch.zeros(7, 3), 0.0, 0.1)
    with pytest.raises(ValueError, match="bias"):
        sparse_gemv(x[:2], torch.zeros(8, 3), 0.0, 0.1, torch.zeros(4))


@pytest.mark.parametrize("compact", [True, False], ids=["compacted", "predicated"])
@pytest.mark.parametrize("B,use_dot", [(1, False), (1, True), (3, True)])
def test_one_chunk_many_chunks_and_the_predicated_loop_agree_with_ref(compact, B, use_dot):
    """Configs the GPU sweep times (launch_config's overrides): one chunk (no workspace) and several (the last
    arriver's fixed-order reduce, in reduce steps of 1 and of several partials), FMA and tl.dot accumulation (the
    expert variant too), the compacted and the predicated loop."""
    g = make_gen(11)
    K, N = 100, 21
    x, wt, bias = randn(g, B, K, dtype=torch.bfloat16), randn(g, K, N, dtype=torch.bfloat16, scale=0.1), \
        randn(g, N, dtype=torch.bfloat16)
    ref = sparse_gemv_ref(x, wt, 0.0, 0.4, bias)
    for chunk_k, block_j in ((128, 16), (32, 16), (16, 16)):
        cfg = launch_config(K, N, B, interpreted=True, chunk_k=chunk_k, block_j=block_j, compact=compact,
                            use_dot=use_dot)
        assert cfg["constexprs"]["SPLIT"] == -(-K // chunk_k)
        check_op(sparse_gemv(x, wt, 0.0, 0.4, bias, config=cfg), ref, torch.bfloat16, what=f"chunk {chunk_k}")
    e_wt, experts, e_bias = randn(g, 3, K, N, scale=0.1), torch.tensor([2, 0, 2][:B], device=g.device), randn(g, 3, N)
    cfg = launch_config(K, N, 1, B, interpreted=True, chunk_k=32, compact=compact, use_dot=use_dot)
    check_op(sparse_expert_gemv(x.float(), e_wt, experts, 0.1, 0.4, e_bias, config=cfg),
             sparse_expert_gemv_ref(x.float(), e_wt, experts, 0.1, 0.4, e_bias), torch.float32, what="experts")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,C,K,conv_bias,d_conv", [(1, 40, 70, True, 4), (3, 37, 40, False, 4), (4, 24, 33, True, 3)])
def test_fused_conv_epilogue_matches_sparse_projection_then_conv_update(B, C, K, conv_bias, d_conv, dtype):
    """in_proj of the SCAP path with Mamba's decode conv in its epilogue (done by the last arriving chunk) ==
    sparse_gemv_ref, then causal_conv1d_update_ref on the first C outputs; the state shifts by one exactly."""
    g = make_gen(9)
    N = 2 * C
    x, wt, b = randn(g, B, K, dtype=dtype), randn(g, K, N, dtype=dtype, scale=K ** -0.5), randn(g, N, dtype=dtype)
    state = randn(g, B, C, d_conv)
    cw, cb = randn(g, C, d_conv, dtype=dtype), randn(g, C, dtype=dtype) if conv_bias else None
    xz_ref = sparse_gemv_ref(x, wt, 0.1, 0.5, b)
    xc_ref, state_ref = causal_conv1d_update_ref(xz_ref[:, :C], state.clone(), cw, cb, "silu")
    out = sparse_gemv(x, wt, 0.1, 0.5, b, conv=(state, cw, cb))
    check_op(out[:, :C], xc_ref, dtype, what="conv output")
    check_op(out[:, C:], xz_ref[:, C:], dtype, what="z")
    assert torch.equal(state[..., :-1], state_ref[..., :-1])
    check_op(state[..., -1], state_ref[..., -1], dtype, what="conv state, newest input")


def test_gpu_launch_config_fills_the_machine():
    """A pure function of shapes: at the 2.8B shapes every projection gets >= ~200 programs (out_proj: few column
    tiles, so many K chunks), wide column tiles, at most 64 chunks a tile; the interpreter's config is narrow."""
    shapes = {"in_proj": (1472, 5888, 1, 1), "out_proj": (2944, 1472, 1, 1), "fc1": (1472, 7744, 1, 1),
              "fc2": (3872, 1472, 1, 1), "in_proj b4": (1472, 5888, 4, 1)}
    for name, (K, N, B, groups) in shapes.items():
        cfg = launch_config(K, N, B, groups)
        c = cfg["constexprs"]
        programs = cfg["grid"][0] * cfg["grid"][1] * cfg["grid"][2]
        print(name, cfg)
        assert programs >= 200 and c["BLOCK_N"] >= 128 and c["SPLIT"] <= 64, name
        assert c["USE_DOT"] == (B > 1) and c["COMPACT"]
    assert launch_config(2944, 1472, 1)["constexprs"]["SPLIT"] > launch_config(1472, 5888, 1)["constexprs"]["SPLIT"]
    assert launch_config(2944, 1472, 1, interpreted=True)["constexprs"]["BLOCK_N"] == 16
    with pytest.raises(ValueError, match="use_dot"):
        launch_config(64, 64, 3, use_dot=False)
