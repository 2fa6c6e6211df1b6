"""SCAP sparse GEMV (fused sparsify + transposed-weight GEMV) vs its fp32 reference: batch 1..4, awkward widths,
with and without the folded bias, thresholds that keep everything / half / nothing; the MoE expert variant with
per-pair experts; and both against the reference model's own sparse linear (F.linear(sparsify_ref(x), W, b'))."""

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
from mambadeploy.models.sparsity import sparsify_ref
from mambadeploy.validate.tolerances import op_checker

check_op = op_checker("sparse_gemv")  # fp32 on the CPU: this op's measured bound


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# full (GPU only): BlackMamba-2.8B in_proj, x_proj, out_proj at batch 1 and 4
@pytest.mark.parametrize("B,N,K", small((1, 40, 72), (3, 37, 50), (4, 5, 33), (2, 70, 31)) + full(
    (1, 5888, 1472), (4, 5888, 1472), (1, 124, 2944), (1, 1472, 2944), (4, 1472, 2944)))
@pytest.mark.parametrize("threshold", [-1.0, 0.6, 1e9], ids=["keep-all", "about-half", "drop-all"])
def test_sparse_gemv_matches_ref(B, N, K, threshold, dtype):
    g = make_gen()
    x = randn(g, B, K, dtype=dtype)
    wt = randn(g, K, N, dtype=dtype, scale=K ** -0.5)
    bias = randn(g, N, dtype=dtype) if N % 2 == 0 else None
    mode = 0.1
    y = sparse_gemv(x, wt, mode, threshold, bias)
    ref = sparse_gemv_ref(x, wt, mode, threshold, bias)
    assert y.shape == (B, N) and y.dtype == dtype
    check_op(y, ref, dtype, what=f"sparse_gemv {B}x{N}x{K} t={threshold}")
    if threshold > 1e8:
        assert torch.equal(y, (bias if bias is not None else torch.zeros(N, dtype=dtype)).expand(B, N).to(y.device))


def test_sparse_gemv_equals_the_reference_models_sparse_linear():
    g = make_gen(7)
    x, w, b = randn(g, 2, 45), randn(g, 29, 45, scale=45 ** -0.5), randn(g, 29)
    mode, threshold = -0.2, 0.5
    expected = F.linear(sparsify_ref(x, mode, threshold), w, b)
    check_op(sparse_gemv(x, w.t().contiguous(), mode, threshold, b), expected, torch.float32,
                    what="kernel vs model's sparse linear")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("P,E,N,K", small((1, 4, 24, 40), (4, 3, 33, 17), (6, 8, 16, 64)) + full(
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


def test_shape_errors():
    x = torch.zeros(5, 8)
    with pytest.raises(ValueError, match="batch 5"):
        sparse_gemv(x, torch.zeros(8, 3), 0.0, 0.1)
    with pytest.raises(ValueError, match="do not fit"):
        sparse_gemv(x[:2], torch.zeros(7, 3), 0.0, 0.1)


@pytest.mark.parametrize("split_k", [2, 3])
def test_split_k_adds_partial_sums_and_the_bias_once(split_k):
    """The GPU launch splits K into fp32 atomic partial sums (launch_config); forced here in the interpreter."""
    g = make_gen(11)
    x, wt, bias = randn(g, 3, 100, dtype=torch.bfloat16), randn(g, 100, 21, dtype=torch.bfloat16, scale=0.1), \
        randn(g, 21, dtype=torch.bfloat16)
    y = sparse_gemv(x, wt, 0.0, 0.4, bias, split_k=split_k)
    assert y.dtype == torch.bfloat16
    check_op(y, sparse_gemv_ref(x, wt, 0.0, 0.4, bias), torch.bfloat16, what=f"split {split_k}")
    e_wt, experts = randn(g, 3, 100, 21, scale=0.1), torch.tensor([2, 0, 2], device=g.device)
    e_bias = randn(g, 3, 21)
    check_op(sparse_expert_gemv(x.float(), e_wt, experts, 0.1, 0.4, e_bias, split_k=split_k),
                    sparse_expert_gemv_ref(x.float(), e_wt, experts, 0.1, 0.4, e_bias), torch.float32,
                    what=f"expert split {split_k}")


def test_gpu_launch_config_fills_the_machine():
    """A pure function of shapes: the 2.8B out_proj (K 2944, N 1472) at batch 1 gets split-K, in_proj does not need
    as much; the interpreter never splits unless asked."""
    out_proj = launch_config(2944, 1472, 1, interpreted=False)
    in_proj = launch_config(1472, 5888, 1, interpreted=False)
    for cfg in (out_proj, in_proj):
        programs = cfg["grid"][0] * cfg["grid"][1] * cfg["grid"][2]
        assert programs >= 200 and cfg["k_per_split"] % cfg["BLOCK_K"] == 0
    assert out_proj["SPLIT_K"] > in_proj["SPLIT_K"] >= 1
    assert launch_config(2944, 1472, 1, interpreted=True)["SPLIT_K"] == 1
