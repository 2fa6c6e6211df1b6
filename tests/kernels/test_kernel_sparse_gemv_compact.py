"""The compacting SCAP sparse GEMV (kernels/sparse_gemv_compact.py: the MoE expert sites' kernel of torch-fast's
per-site choice) vs its fp32 reference, at the shapes that could have exposed the crash of commit 674d32b: batch 1 and
several pairs, K not a multiple of the chunk, every feature dropped and none dropped, one chunk and several (the last
arriver's reduce), the gated fc1 and routing-scaled fc2 epilogues; and out-of-range expert ids against a guard buffer
(the kernel must read nothing outside the experts' weights). The PDL ordering half of the crash (the expert id read
before the grid-dependency wait) is checked on the sm_90 PTX in test_kernel_compile.py."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DTYPES, make_gen, needs_gpu, randn

from mambadeploy.kernels.sparse_gemv_compact import (
    launch_config,
    sparse_expert_gemv,
    sparse_expert_gemv_ref,
    sparse_gemv,
    sparse_gemv_ref,
)
from mambadeploy.validate.tolerances import op_checker

check_op = op_checker("sparse_gemv")
MODE = 0.05


def _threshold(x, sparsity: float) -> float:
    """The threshold that drops `sparsity` of |x - MODE| (-1: keep all; 1e9: drop all)."""
    if sparsity <= 0:
        return -1.0
    if sparsity >= 1:
        return 1e9
    return float(torch.quantile((x.float() - MODE).abs().flatten().cpu(), sparsity))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("P,E,N,K,chunk_k", [(1, 3, 24, 45, 16), (3, 2, 37, 70, 32), (4, 4, 20, 33, 64)],
                         ids=["pair1-3chunks", "pairs3-3chunks", "pairs4-1chunk"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0], ids=["none-dropped", "half", "all-dropped"])
def test_compact_expert_gemv_matches_ref(P, E, N, K, chunk_k, sparsity, dtype):
    """K off every chunk multiple (45 = 2 x 16 + 13, 70 = 2 x 32 + 6, 33 < 64): the last chunk is partial."""
    g = make_gen(3)
    x = randn(g, P, K, dtype=dtype)
    wt = randn(g, E, K, N, dtype=dtype, scale=K ** -0.5)
    experts = torch.randint(0, E, (P,), generator=g, device=g.device)
    bias = randn(g, E, N, dtype=dtype)
    t = _threshold(x, sparsity)
    cfg = launch_config(K, N, 1, P, interpreted=True, chunk_k=chunk_k)
    assert cfg["constexprs"]["SPLIT"] == -(-K // chunk_k)
    y = sparse_expert_gemv(x, wt, experts, MODE, t, bias, config=cfg)
    ref = sparse_expert_gemv_ref(x, wt, experts, MODE, t, bias)
    check_op(y, ref, dtype, what=f"compact experts P={P} {N}x{K} chunk {chunk_k} sparsity {sparsity}")
    if sparsity >= 1:  # nothing kept: exactly each pair's expert bias
        assert torch.equal(y, bias[experts])


@pytest.mark.parametrize("B", [1, 3])
def test_compact_dense_site_gemv_matches_ref(B):
    """The dense-layer form (one row group, the batch sharing wt), 2 chunks with a partial one, bias, bf16."""
    g = make_gen(5)
    K, N = 50, 29
    x, wt = randn(g, B, K, dtype=torch.bfloat16), randn(g, K, N, dtype=torch.bfloat16, scale=0.2)
    bias = randn(g, N, dtype=torch.bfloat16)
    t = _threshold(x, 0.5)
    cfg = launch_config(K, N, B, interpreted=True, chunk_k=32)
    check_op(sparse_gemv(x, wt, MODE, t, bias, config=cfg), sparse_gemv_ref(x, wt, MODE, t, bias), torch.bfloat16,
             what=f"compact dense-layer B={B}")


@pytest.mark.parametrize("P,activation", [(1, "gelu"), (3, "silu")])
def test_gated_fc1_and_scaled_fc2_epilogues(P, activation):
    """The two launches of the sparse MoE layer: fc1 with act(gate) * up, fc2 times the pair's routing weight."""
    g = make_gen(13)
    E, F, K = 3, 21, 40
    x = randn(g, P, K, dtype=torch.bfloat16)
    wt1, b1 = randn(g, E, K, 2 * F, dtype=torch.bfloat16, scale=K ** -0.5), randn(g, E, 2 * F, dtype=torch.bfloat16)
    wt2 = randn(g, E, F, K, dtype=torch.bfloat16, scale=F ** -0.5)
    experts = torch.randint(0, E, (P,), generator=g, device=g.device)
    weights = torch.rand(P, generator=g, device=g.device)
    a = sparse_expert_gemv(x, wt1, experts, MODE, 0.4, b1, activation=activation,
                           config=launch_config(K, F, 1, P, interpreted=True, chunk_k=16))
    check_op(a, sparse_expert_gemv_ref(x, wt1, experts, MODE, 0.4, b1, activation=activation), torch.bfloat16,
             what=f"fc1 + {activation}")
    y = sparse_expert_gemv(a, wt2, experts, 0.0, 0.1, scale=weights)
    check_op(y, sparse_expert_gemv_ref(a, wt2, experts, 0.0, 0.1, scale=weights), torch.bfloat16,
             what="fc2 x routing weight")


@pytest.mark.parametrize("bad", [-1, 3, 1 << 40], ids=["minus1", "E", "huge"])
def test_out_of_range_expert_reads_nothing_outside_the_weights(bad):
    """wt and bias sit inside buffers padded on both sides with NaN guards: an id outside [0, E) (a stale or
    uninitialised routing buffer) must read no guard (no NaN anywhere) and give a zero row; valid pairs are exact."""
    g = make_gen(17)
    E, K, N, pad = 3, 40, 24, 4096
    wt_buf = torch.full((pad + E * K * N + pad,), float("nan"), device=g.device)
    wt = wt_buf[pad:pad + E * K * N].view(E, K, N)
    wt.copy_(randn(g, E, K, N, scale=0.2))
    b_buf = torch.full((pad + E * N + pad,), float("nan"), device=g.device)
    bias = b_buf[pad:pad + E * N].view(E, N)
    bias.copy_(randn(g, E, N))
    x = randn(g, 3, K)
    experts = torch.tensor([1, bad, 2], device=g.device)
    cfg = launch_config(K, N, 1, 3, interpreted=True, chunk_k=16)
    y = sparse_expert_gemv(x, wt, experts, MODE, 0.3, bias, config=cfg)
    print("output has NaN:", bool(torch.isnan(y).any()))
    assert not torch.isnan(y).any()
    assert torch.equal(y[1], torch.zeros_like(y[1]))
    ok = torch.tensor([0, 2])
    check_op(y[ok], sparse_expert_gemv_ref(x[ok], wt, experts[ok], MODE, 0.3, bias), torch.float32,
             what="valid pairs beside an invalid one")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("P", [1, 4])
def test_runner_tiles_at_the_2_8b_expert_sites(P):
    """GPU only: the compacting expert GEMVs with the tiles torch-fast launches (fast_sparse.EXPERT_TILES), BlackMamba-
    2.8B fc1 (gated GELU) and fc2 (routing scale), bf16, target 0.5, an invalid id beside valid ones at P = 4."""
    from mambadeploy.runtime.fast_sparse import EXPERT_TILES

    g = make_gen(31)
    E, d, F = 8, 1472, 3872
    x = randn(g, P, d, dtype=torch.bfloat16)
    wt1 = randn(g, E, d, 2 * F, dtype=torch.bfloat16, scale=d ** -0.5)
    wt2 = randn(g, E, F, d, dtype=torch.bfloat16, scale=F ** -0.5)
    experts = torch.arange(P, device=g.device) % E
    weights = torch.rand(P, generator=g, device=g.device)
    t = _threshold(x, 0.5)
    a = sparse_expert_gemv(x, wt1, experts, MODE, t, activation="gelu", tiles=EXPERT_TILES["fc1"])
    check_op(a, sparse_expert_gemv_ref(x, wt1, experts, MODE, t, activation="gelu"), torch.bfloat16, what="fc1")
    y = sparse_expert_gemv(a, wt2, experts, 0.0, _threshold(a, 0.5), scale=weights, tiles=EXPERT_TILES["fc2"])
    ref = sparse_expert_gemv_ref(a, wt2, experts, 0.0, _threshold(a, 0.5), scale=weights)
    check_op(y, ref, torch.bfloat16, what="fc2")
    if P > 1:
        bad = experts.clone()
        bad[1] = 1 << 40
        y = sparse_expert_gemv(a, wt2, bad, 0.0, _threshold(a, 0.5), scale=weights, tiles=EXPERT_TILES["fc2"])
        torch.cuda.synchronize()
        assert torch.equal(y[1], torch.zeros_like(y[1]))
        check_op(y[[0, 2, 3]], ref[[0, 2, 3]], torch.bfloat16, what="valid pairs beside an invalid id")
