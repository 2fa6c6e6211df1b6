"""The torch-fast Triton kernels behind the compact parameter lists the ORT CUDA library launches (ops_cuda_aot.cc):
device pointers of contiguous tensors, then int32 run-time sizes. Model widths (d, F, E, d_state) are constexprs, so
each compiled kernel is specialised to its model exactly as the JIT specialises torch-fast's; strides follow from the
contiguous layouts ORT hands a custom op. Each adapter only computes strides and calls the kernel body (Triton inlines
the call): the math is the kernels' own, unchanged.

Parameter orders here are the contract with ops_cuda_aot.cc (which passes exactly these, in order)."""

from __future__ import annotations

import triton
import triton.language as tl

from ...kernels.causal_conv1d import causal_conv1d_kernel
from ...kernels.moe_experts import moe_gemm_fc1_kernel, moe_gemm_fc2_kernel
from ...kernels.moe_routing import moe_align_kernel
from ...kernels.selective_scan import selective_scan_fold_kernel, selective_scan_seg_kernel

# DecodeAttention's three launches use the TensorRT plugin's adapters as they are (same parameter contract)
from ..aot_kernels import (  # noqa: F401  (re-exported: aot_table compiles them by name)
    decode_attention_combine_trt,
    decode_attention_split_trt,
    decode_attention_write_trt,
)


@triton.jit
def moe_align_ort(experts, sorted_pairs, block_expert, P, n_blocks,
                  E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_P: tl.constexpr):
    # experts: (P,) int64 (TopKExpertGather) or int32 (RoutedMoE's router); outputs int32
    moe_align_kernel(experts, sorted_pairs, block_expert, P, E, n_blocks, BLOCK_M, BLOCK_E, BLOCK_P)


@triton.jit
def moe_fc1_ort(x, w1, sorted_pairs, block_expert, h, P,
                d: tl.constexpr, F: tl.constexpr, E: tl.constexpr, TOP_K: tl.constexpr, ACTIVATION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    # x (T, d); w1 (E, 2F, d); h (P, F)
    moe_gemm_fc1_kernel(x, w1, sorted_pairs, block_expert, h, P, F, d, E, d, 2 * F * d, d, 1, F,
                        TOP_K, ACTIVATION, BLOCK_M, BLOCK_N, BLOCK_K, False, PRECISION)


@triton.jit
def moe_fc2_ort(h, w2, sorted_pairs, block_expert, weights, out, P,
                d: tl.constexpr, F: tl.constexpr, E: tl.constexpr, TOP_K: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    # h (P, F); w2 (E, d, F); weights (P,) fp32; out: y (T, d) for top-1, fp32 rows (P, d) for top-k
    moe_gemm_fc2_kernel(h, w2, sorted_pairs, block_expert, weights, out, P, d, F, E, F, d * F, F, 1, d,
                        TOP_K, BLOCK_M, BLOCK_N, BLOCK_K, False, PRECISION)


@triton.jit
def moe_sum_ort(rows, y, T, d: tl.constexpr, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    """y[t] = sum over the k slots of the fp32 rows (T, k, d), rounded once: expert_gather's `out.view(T, k, d).sum(1)`."""
    tok = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < d
    acc = tl.load(rows + tok * TOP_K * d + offs, mask=mask, other=0.0)
    for j in tl.static_range(1, TOP_K):
        acc += tl.load(rows + (tok * TOP_K + j) * d + offs, mask=mask, other=0.0)
    tl.store(y + tok * d + offs, acc.to(y.dtype.element_ty), mask=mask)


@triton.jit
def scan_pass_ort(u, delta, A, B, C, D, z, delta_bias, h0, y, h_last, hseg, dseg, dim, seqlen, seg_len, n_seg,
                  d_state: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr,
                  DELTA_SOFTPLUS: tl.constexpr, HAS_H0: tl.constexpr, STATE_PASS: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    # contiguous: u/delta/z/y (b, dim, L); B/C (b, N, L); A (dim, N); states (b, dim, N). int64 batch strides: a
    # 256K-token prompt at d_inner 8192 is 2^31 elements per row
    s_bdl = dim.to(tl.int64) * seqlen
    s_bnl = seqlen.to(tl.int64) * d_state
    selective_scan_seg_kernel(
        u, delta, A, B, C, D, z, delta_bias, h0, y, h_last, hseg, dseg,
        dim, seqlen, d_state, seg_len, n_seg,
        s_bdl, seqlen, 1,
        s_bdl, seqlen, 1,
        s_bdl, seqlen, 1,
        s_bdl, seqlen, 1,
        s_bnl, seqlen, 1,
        s_bnl, seqlen, 1,
        d_state, 1,
        dim * d_state, d_state, 1,
        dim * d_state, d_state, 1,
        HAS_D, HAS_Z, HAS_DELTA_BIAS, DELTA_SOFTPLUS, HAS_H0, STATE_PASS, BLOCK_D, BLOCK_N,
    )


@triton.jit
def scan_fold_ort(A, h0, hseg, dseg, dim, n_seg,
                  d_state: tl.constexpr, HAS_H0: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK: tl.constexpr):
    selective_scan_fold_kernel(A, h0, hseg, dseg, dim, d_state, n_seg, d_state, 1, dim * d_state, d_state, 1,
                               HAS_H0, BLOCK_N, BLOCK)


@triton.jit
def conv_ort(x, weight, bias, initial_state, y, final_state, dim, seqlen,
             K: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
             SILU: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    # contiguous: x/y (b, dim, L); weight (dim, K); states (b, dim, K)
    s_bdl = dim.to(tl.int64) * seqlen
    causal_conv1d_kernel(x, weight, bias, initial_state, y, final_state, dim, seqlen,
                         s_bdl, seqlen, 1, s_bdl, seqlen, 1, K, 1, dim * K, K, 1, dim * K, K, 1,
                         K, BLOCK_K, HAS_BIAS, HAS_INIT, SILU, BLOCK_D, BLOCK_L)
