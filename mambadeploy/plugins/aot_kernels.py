"""Adapter kernels: each op's Triton kernel (mambadeploy/kernels) behind the parameter order a TensorRT AOT plugin
launches with — input pointers in the op's input order, then int32 scalars, then output pointers — for contiguous
(LINEAR) tensors, which is what TensorRT hands a plugin. The adapter computes the strides the kernel takes from the
scalars and calls the kernel body (Triton inlines the call), so the math is the kernels' own, unchanged.

Every optional input is present here: the TensorRT graph preparation (trt_graph.py) fills omitted ones with zeros.

TopKExpertGather is the exception to "the kernels' own body": kernels/moe_experts.py runs it as two launches (fc1 into a
(pairs, F) workspace, then fc2), and a TensorRT AOT plugin is ONE kernel with no workspace. `expert_gather_trt` is
therefore a fused single-launch kernel, built from the same device functions (activate, fsum) and the same rounding of
the gated hidden h to the model dtype: grid (tokens, blocks of BLOCK_N output columns); each program walks its token's
k experts and the hidden width F in BLOCK_F slices, computing the h slice (fc1 over all of d) and accumulating its
contribution to the program's BLOCK_N outputs (fc2). The price: fc1 is recomputed by each of the cdiv(d, BLOCK_N)
programs of a token, so BLOCK_N is as wide as registers allow. Correct for every shape; fast only where the op is
launch- or bandwidth-bound (decode).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..kernels.causal_conv1d import causal_conv1d_kernel
from ..kernels.common import activate, fsum, next_pow2
from ..kernels.selective_scan import selective_scan_kernel


@triton.jit
def selective_scan_trt(
    u, delta, A, B, C, D, z, delta_bias, initial_state,  # inputs, op order
    dim, seqlen, d_state,  # int32 scalars
    y, last_state,  # outputs
    DELTA_SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    # contiguous strides: u/delta/z/y (b, dim, L); B/C (b, N, L); A (dim, N); states (b, dim, N)
    s_bdl = dim * seqlen
    s_bnl = d_state * seqlen
    s_bdn = dim * d_state
    selective_scan_kernel(
        u, delta, A, B, C, D, z, delta_bias, initial_state, y, last_state,
        dim, seqlen, d_state,
        s_bdl, seqlen, 1,
        s_bdl, seqlen, 1,
        s_bdl, seqlen, 1,
        s_bdl, seqlen, 1,
        s_bnl, seqlen, 1,
        s_bnl, seqlen, 1,
        d_state, 1,
        s_bdn, d_state, 1,
        s_bdn, d_state, 1,
        True, True, True, DELTA_SOFTPLUS, True, BLOCK_D, BLOCK_N, CHUNK,
    )


@triton.jit
def causal_conv1d_trt(
    x, weight, bias, initial_state,  # inputs, op order
    dim, seqlen,  # int32 scalars
    y, final_state,  # outputs
    K: tl.constexpr, BLOCK_K: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    # contiguous strides: x/y (b, dim, L); weight (dim, K); states (b, dim, K)
    s_bdl = dim * seqlen
    s_bdk = dim * K
    causal_conv1d_kernel(
        x, weight, bias, initial_state, y, final_state,
        dim, seqlen,
        s_bdl, seqlen, 1, s_bdl, seqlen, 1, K, 1,
        s_bdk, K, 1, s_bdk, K, 1,
        K, BLOCK_K, True, True, SILU, BLOCK_D, BLOCK_L,
    )


@triton.jit
def expert_gather_trt(
    x, w1, w2, experts, weights,  # inputs, op order
    d, F,  # int32 scalars
    y,  # output
    TOP_K: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # contiguous: x/y (T, d); w1 (E, 2F, d) = [gate; up]; w2 (E, d, F); experts/weights (T, TOP_K)
    tok = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < d
    x_row = x + tok * d
    acc = tl.full((BLOCK_N,), 0.0, tl.float32)
    for j in tl.static_range(TOP_K):
        e = tl.load(experts + tok * TOP_K + j).to(tl.int64)
        gate_rows = w1 + e * 2 * F * d
        w2_rows = w2 + e * d * F + offs_n[:, None] * F
        part = tl.full((BLOCK_N, BLOCK_F), 0.0, tl.float32)
        for f0 in range(0, F, BLOCK_F):
            offs_f = f0 + tl.arange(0, BLOCK_F)
            mask_f = offs_f < F
            acc_g = tl.full((BLOCK_F, BLOCK_K), 0.0, tl.float32)
            acc_u = tl.full((BLOCK_F, BLOCK_K), 0.0, tl.float32)
            for k0 in range(0, d, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                mk = kk < d
                xv = tl.load(x_row + kk, mask=mk, other=0.0).to(tl.float32)[None, :]
                m = mask_f[:, None] & mk[None, :]
                acc_g += tl.load(gate_rows + offs_f[:, None] * d + kk[None, :], mask=m, other=0.0).to(tl.float32) * xv
                acc_u += tl.load(gate_rows + (offs_f + F)[:, None] * d + kk[None, :], mask=m,
                                 other=0.0).to(tl.float32) * xv
            h = activate(fsum(acc_g, 1), ACTIVATION) * fsum(acc_u, 1)
            h = h.to(y.dtype.element_ty).to(tl.float32)  # h lives in the model dtype, as in the two-launch kernels
            w = tl.load(w2_rows + offs_f[None, :], mask=mask_n[:, None] & mask_f[None, :], other=0.0).to(tl.float32)
            part += w * h[None, :]
        acc += fsum(part, 1) * tl.load(weights + tok * TOP_K + j).to(tl.float32)
    tl.store(y + tok * d + offs_n, acc.to(y.dtype.element_ty), mask=mask_n)


def expert_gather_launch_config(shapes, dtypes=None) -> dict:
    """Launch choice for expert_gather_trt. shapes: (x (T, d), w1 (E, 2F, d), w2, experts (T, k), weights)."""
    d = shapes[0][1]
    block_n = min(next_pow2(d), 256)  # wide: every extra column block recomputes fc1
    return {"num_warps": 8 if block_n >= 256 else 4, "num_stages": 1,
            "constexprs": {"TOP_K": shapes[3][1], "BLOCK_N": block_n, "BLOCK_F": 16, "BLOCK_K": 64}}
