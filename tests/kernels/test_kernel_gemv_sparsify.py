"""The dense decode GEMV with SCAP's sparsifier fused into its x loads (gemv(..., sparsify=(mode, threshold))): what a
SCAP site runs when torch-fast's per-site choice (runtime/fast_sparse.py) gives it the dense kernel. It must equal the
reference model's sparse linear, gemv_ref(sparsify_ref(x), W, b'): batch 1 (FMA) and 3 (tl.dot), split-K (the
interpreter splits K over 32-wide chunks), widths off block multiples, thresholds keeping all / half / none, and
in_proj's fused conv epilogue."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DTYPES, make_gen, randn

from mambadeploy.kernels.gemv import gemv, gemv_ref
from mambadeploy.models.ref_ops import causal_conv1d_update_ref
from mambadeploy.models.sparsity import sparsify_ref
from mambadeploy.validate.tolerances import op_checker

check_op = op_checker("gemv")
MODE = -0.15


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,K", [(1, 40, 72), (3, 37, 150), (1, 5, 33)])
@pytest.mark.parametrize("threshold", [-1.0, 0.6, 1e9], ids=["keep-all", "about-half", "drop-all"])
def test_sparsified_gemv_equals_the_reference_sparse_linear(M, N, K, threshold, dtype):
    g = make_gen(21)
    x, w, b = randn(g, M, K, dtype=dtype), randn(g, N, K, dtype=dtype, scale=K ** -0.5), randn(g, N, dtype=dtype)
    y = gemv(x, w, b, sparsify=(MODE, threshold))
    ref = gemv_ref(sparsify_ref(x, MODE, threshold), w, b)
    check_op(y, ref, dtype, what=f"sparsified gemv {M}x{N}x{K} t={threshold}")
    if threshold > 1e8:  # every input dropped: exactly the bias
        assert torch.equal(y, b.expand(M, N))


@pytest.mark.parametrize("M", [1, 3])
def test_sparsified_in_proj_with_the_fused_conv(M):
    g = make_gen(23)
    C, K, d_conv = 37, 40, 4
    x, w, b = randn(g, M, K, dtype=torch.bfloat16), randn(g, 2 * C, K, dtype=torch.bfloat16, scale=0.2), \
        randn(g, 2 * C, dtype=torch.bfloat16)
    state = randn(g, M, C, d_conv)
    cw, cb = randn(g, C, d_conv, dtype=torch.bfloat16), randn(g, C, dtype=torch.bfloat16)
    xz_ref = gemv_ref(sparsify_ref(x, MODE, 0.5), w, b)
    xc_ref, _ = causal_conv1d_update_ref(xz_ref[:, :C], state.clone(), cw, cb, "silu")
    out = gemv(x, w, b, conv=(state, cw, cb), sparsify=(MODE, 0.5))
    check_op(out[:, :C], xc_ref, torch.bfloat16, what="conv output")
    check_op(out[:, C:], xz_ref[:, C:], torch.bfloat16, what="z")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,top_k,d,F,E,activation", [(1, 1, 40, 24, 4, "gelu"), (1, 1, 33, 21, 3, "silu"),
                                                      (3, 1, 40, 24, 4, "gelu"), (2, 2, 33, 21, 3, "silu")],
                         ids=["gemv-gelu", "gemv-silu", "gemm-b3-top1", "gemm-b2-top2"])
def test_sparsified_dense_experts_equal_the_sparse_moe_reference(T, top_k, d, F, E, activation, dtype):
    """The dense expert kernels with SCAP's sparsifiers and folded biases on fc1's and fc2's inputs ==
    models/sparsity.sparse_moe_ref (the reference model's sparse MoE): the batch-1 top-1 GEMVs (fc1 + gated activation,
    fc2 x routing weight) and the grouped GEMM of decode batches (top-1 and top-2)."""
    from mambadeploy.kernels.moe_experts import expert_gather
    from mambadeploy.models.ref_ops import route_ref
    from mambadeploy.models.sparsity import Sparsifier, sparse_moe_ref

    g = make_gen(29)
    x = randn(g, T, d, dtype=dtype)
    w1, w2 = randn(g, E, 2 * F, d, dtype=dtype, scale=d ** -0.5), randn(g, E, d, F, dtype=dtype, scale=F ** -0.5)
    rw, rb = randn(g, E, d, dtype=dtype), randn(g, E, dtype=dtype)
    sparse = {"fc1": Sparsifier(0.1, 0.5, (E, 2 * F)), "fc2": Sparsifier(-0.05, 0.02, (E, d))}
    with torch.no_grad():
        for sp in sparse.values():
            sp.folded_bias.copy_(randn(g, *sp.folded_bias.shape))
            sp.to(device=x.device, dtype=dtype)
        router = "sigmoid_top1" if top_k == 1 else "softmax_topk"
        ref = sparse_moe_ref(x, rw, rb, w1, w2, router, top_k, activation, sparse)
        weights, experts = route_ref(torch.nn.functional.linear(x, rw, rb), router, top_k)
        specs = tuple((sp.mode, sp.threshold, sp.folded_bias) for sp in sparse.values())
        y = expert_gather(x, w1, w2, experts, weights, activation, sparse=specs)
    check_op(y, ref, dtype, what=f"sparsified expert GEMVs d={d} F={F} {activation}")
