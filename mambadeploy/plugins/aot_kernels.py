"""Adapter kernels: each op's Triton kernel (mambadeploy/kernels) behind the parameter order a TensorRT AOT plugin
launches with — input pointers in the op's input order, then int32 scalars, then output pointers — for contiguous
(LINEAR) tensors, which is what TensorRT hands a plugin. The adapter computes the strides the kernel takes from the
scalars and calls the kernel body (Triton inlines the call), so the math is the kernels' own, unchanged.

Every optional input is present here: the TensorRT graph preparation (trt_graph.py) fills omitted ones with zeros.
"""

from __future__ import annotations

import triton
import triton.language as tl

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
