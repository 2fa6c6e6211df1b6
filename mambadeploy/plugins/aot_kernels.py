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

from ..kernels.causal_conv1d import causal_conv1d_kernel, causal_conv1d_update_kernel
from ..kernels.common import activate, fmax, fsum, next_pow2, sigmoid
from ..kernels.decode_attention import decode_attention_combine_kernel, decode_attention_split_kernel
from ..kernels.rms_norm import add_rms_norm_kernel
from ..kernels.selective_scan import selective_scan_kernel
from ..kernels.selective_state_update import selective_state_update_kernel


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
def _expert_columns(x_row, w1, w2, e, d, F, offs_n, mask_n, ACTIVATION: tl.constexpr, OUT_TY: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr):
    """Expert e's output columns offs_n for one token: fc2(act(x W_gate) * (x W_up)), fc1 recomputed over all of d,
    h rounded to OUT_TY (the model dtype) as in the two-launch kernels. (BLOCK_N,) fp32."""
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
        h = h.to(OUT_TY).to(tl.float32)
        w = tl.load(w2_rows + offs_f[None, :], mask=mask_n[:, None] & mask_f[None, :], other=0.0).to(tl.float32)
        part += w * h[None, :]
    return fsum(part, 1)


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
    acc = tl.full((BLOCK_N,), 0.0, tl.float32)
    for j in tl.static_range(TOP_K):
        e = tl.load(experts + tok * TOP_K + j).to(tl.int64)
        acc += _expert_columns(x + tok * d, w1, w2, e, d, F, offs_n, mask_n, ACTIVATION, y.dtype.element_ty,
                               BLOCK_N, BLOCK_F, BLOCK_K) * tl.load(weights + tok * TOP_K + j).to(tl.float32)
    tl.store(y + tok * d + offs_n, acc.to(y.dtype.element_ty), mask=mask_n)


def expert_gather_launch_config(shapes, dtypes=None) -> dict:
    """Launch choice for expert_gather_trt. shapes: (x (T, d), w1 (E, 2F, d), w2, experts (T, k), weights)."""
    d = shapes[0][1]
    block_n = min(next_pow2(d), 256)  # wide: every extra column block recomputes fc1
    return {"num_warps": 8 if block_n >= 256 else 4, "num_stages": 1,
            "constexprs": {"TOP_K": shapes[3][1], "BLOCK_N": block_n, "BLOCK_F": 16, "BLOCK_K": 64}}


# --------------------------------------------------------------------------- the decode step's ops
# The torch-fast kernels update their states in place; the registry ops are pure (state in, new state out). So each
# adapter first copies its own program's tile of the state into the output, waits for the copy (debug_barrier), and
# runs the kernel body on the output. Every optional input is present (trt_graph.py fills omitted ones with zeros).
@triton.jit
def conv_update_trt(
    x, conv_state, weight, bias,  # inputs, op order
    dim,  # int32 scalar
    y, new_state,  # outputs
    K: tl.constexpr, BLOCK_K: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # contiguous: x/y (b, dim); states (b, dim, K); weight (dim, K)
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    tile = b * dim * K + offs_d[:, None] * K + offs_k[None, :]
    m = (offs_d < dim)[:, None] & (offs_k < K)[None, :]
    tl.store(new_state + tile, tl.load(conv_state + tile, mask=m, other=0.0), mask=m)
    tl.debug_barrier()
    causal_conv1d_update_kernel(x, new_state, weight, bias, y, dim, dim, 1, dim * K, K, 1, K, 1, dim, 1,
                                K, BLOCK_K, True, SILU, BLOCK_D)


@triton.jit
def state_update_trt(
    state, x, dt, A, B, C, D, z, dt_bias,  # inputs, op order
    dim, d_state,  # int32 scalars
    y, new_state,  # outputs
    DT_SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    DT_LOW_RANK: tl.constexpr,
):
    # contiguous: states (b, dim, N); x/dt/z/y (b, dim); A (dim, N); B/C (b, N)
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    tile = b * dim * d_state + offs_d[:, None] * d_state + offs_n[None, :]
    m = (offs_d < dim)[:, None] & (offs_n < d_state)[None, :]
    tl.store(new_state + tile, tl.load(state + tile, mask=m, other=0.0), mask=m)
    tl.debug_barrier()
    selective_state_update_kernel(
        new_state, x, dt, A, B, C, D, z, dt_bias, y, x,
        dim, d_state, 0,
        dim * d_state, d_state, 1,
        dim, 1, dim, 1, dim, 1, dim, 1,
        d_state, 1, d_state, 1, d_state, 1, 0, 0,
        True, True, True, DT_SOFTPLUS, False, BLOCK_D, BLOCK_N, BLOCK_R,
    )


@triton.jit
def add_rms_norm_trt(
    x, residual, weight,  # inputs, op order
    d,  # int32 scalar
    y, residual_out,  # outputs
    EPS: tl.constexpr, BLOCK: tl.constexpr,
):
    # contiguous (rows, d); one program per row
    add_rms_norm_kernel(x, residual, weight, y, residual_out, d, EPS, d, d, d, d, True, True, BLOCK)


@triton.jit
def routed_moe_trt(
    x, router_weight, router_bias, w1, w2,  # inputs, op order
    d, F, E,  # int32 scalars
    y,  # output
    ROUTER: tl.constexpr, TOP_K: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """RoutedMoE in one launch: every program routes its token itself (router logits in y's dtype, as the model's
    Linear gives them; ROUTER 0 = sigmoid of the argmax, 1 = softmax top-k, ties to the lower expert), then adds its
    chosen experts' output columns (expert_gather_trt's body). The router is E x d weights: recomputing it per
    program costs little beside the experts."""
    tok = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < d
    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    x_row = x + tok * d
    acc_e = tl.full((BLOCK_E, BLOCK_K), 0.0, tl.float32)
    for k0 in range(0, d, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mk = kk < d
        xv = tl.load(x_row + kk, mask=mk, other=0.0).to(tl.float32)
        wv = tl.load(router_weight + offs_e[:, None] * d + kk[None, :], mask=mask_e[:, None] & mk[None, :], other=0.0)
        acc_e += wv.to(tl.float32) * xv[None, :]
    logits = fsum(acc_e, 1) + tl.load(router_bias + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    logits = tl.where(mask_e, logits.to(y.dtype.element_ty).to(tl.float32), float("-inf"))
    top = fmax(logits, 0)
    total = fsum(tl.where(mask_e, tl.exp(logits - top), 0.0), 0)
    acc = tl.full((BLOCK_N,), 0.0, tl.float32)
    for j in tl.static_range(TOP_K):
        best = fmax(logits, 0)
        e = tl.min(tl.where(logits == best, offs_e, BLOCK_E), 0)  # the first maximum
        if ROUTER == 0:
            gate = sigmoid(best)
        else:
            gate = tl.exp(best - top) / total
        acc += _expert_columns(x_row, w1, w2, e.to(tl.int64), d, F, offs_n, mask_n, ACTIVATION, y.dtype.element_ty,
                               BLOCK_N, BLOCK_F, BLOCK_K) * gate
        logits = tl.where(offs_e == e, float("-inf"), logits)
    tl.store(y + tok * d + offs_n, acc.to(y.dtype.element_ty), mask=mask_n)


def routed_moe_launch_config(shapes, dtypes=None) -> dict:
    """shapes: (x (T, d), router_weight (E, d), router_bias, w1 (E, 2F, d), w2)."""
    d, E = shapes[0][1], shapes[1][0]
    block_n = min(next_pow2(d), 256)  # wide: every extra column block recomputes fc1 (and the router)
    return {"num_warps": 8 if block_n >= 256 else 4, "num_stages": 1,
            "constexprs": {"BLOCK_E": next_pow2(E), "BLOCK_N": block_n, "BLOCK_F": 16, "BLOCK_K": 64}}


def add_rms_norm_launch_config(shapes, dtypes=None) -> dict:
    block = next_pow2(shapes[0][-1])
    return {"num_warps": max(1, min(8, block // 256)), "num_stages": 1, "constexprs": {"BLOCK": block}}


# --------------------------------------------------------------------------- SparseLinear (SCAP)
@triton.jit
def sparse_linear_trt(
    x, weight, bias,  # inputs, op order: x (rows, K), weight (N, K) as nn.Linear stores it, bias (N,) (zeros if omitted)
    K, N,  # int32 scalars
    y,  # output (rows, N)
    MODE: tl.constexpr, THRESHOLD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """kernels/sparse_gemv.py's math on the node's (N, K) weight (sparse_gemv_kernel reads a transposed (K, N) one):
    program (row, block of BLOCK_N outputs); the weight loads of dropped features are masked off, so a dropped
    feature's weights are never read (whole sectors only where consecutive features drop). One launch, no workspace."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.full((BLOCK_N,), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        xv = tl.load(x + row * K + ks, mask=k_ok, other=0.0)
        centred = xv.to(tl.float32) - MODE
        keep = (tl.abs(centred) > THRESHOLD) & k_ok
        xs = tl.where(keep, centred, 0.0).to(xv.dtype).to(tl.float32)  # rounded to x's dtype, as the reference
        w = tl.load(weight + cols[:, None].to(tl.int64) * K + ks[None, :], mask=col_ok[:, None] & keep[None, :],
                    other=0.0)
        acc += fsum(w.to(tl.float32) * xs[None, :], 1)
    acc += tl.load(bias + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(y + row * N + cols, acc.to(y.dtype.element_ty), mask=col_ok)


def sparse_linear_launch_config(shapes, dtypes=None) -> dict:
    """Output blocks of 64 columns, K walked in 64-wide slices (a decode GEMV: bound by the weight bytes read)."""
    return {"num_warps": 4, "num_stages": 2, "constexprs": {"BLOCK_N": 64, "BLOCK_K": 64}}


# --------------------------------------------------------------------------- DecodeAttention: three launches
# torch-fast's split-K decode attention is two kernels (the splits' partials in an fp32 workspace, then the combine);
# the IPluginV3 enqueue (plugins/aot_attention.py) and the ORT CUDA library (ops_cuda_aot.cc AotDecodeAttention) run
# them after a slot-write launch, with a workspace. The same three adapters serve both. Contiguous:
# q/out (B, H, hd); k/v (B, KV, hd); caches (B, KV, S, hd); part (B, H, splits, hd) and lse (B, H, splits) fp32;
# lengths (B,) int32 = pos + 1 (the split kernel reads lengths, the op takes pos).
@triton.jit
def decode_attention_write_trt(
    k, v, pos,  # inputs
    kv_heads, slots,  # int32 scalars
    present_key, present_value, lengths,  # the caches written in place (aliased, or copied first), workspace
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grid (B, KV): present[b, h, pos[b]] = k[b, h]
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    p = tl.load(pos + b)
    offs = tl.arange(0, BLOCK_D)
    m = offs < HEAD_DIM
    src = (b * kv_heads + h) * HEAD_DIM + offs
    dst = ((b * kv_heads + h) * slots + p) * HEAD_DIM + offs
    tl.store(present_key + dst, tl.load(k + src, mask=m), mask=m)
    tl.store(present_value + dst, tl.load(v + src, mask=m), mask=m)
    if h == 0:
        tl.store(lengths + b, (p + 1).to(tl.int32))


@triton.jit
def decode_attention_split_trt(
    q, present_key, present_value, lengths,  # inputs (the caches after the write)
    kv_heads, slots, n_splits, scale,  # int32 scalars, fp32 softmax scale
    part, lse,  # workspace outputs
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # grid (B, KV, splits)
    s_cache_h = slots * HEAD_DIM
    s_cache_b = kv_heads * s_cache_h
    decode_attention_split_kernel(
        q, present_key, present_value, lengths, part, lse,
        GROUP, HEAD_DIM, n_splits, scale,
        kv_heads * GROUP * HEAD_DIM, HEAD_DIM, s_cache_b, s_cache_h, HEAD_DIM, s_cache_b, s_cache_h, HEAD_DIM,
        BLOCK_G, BLOCK_N, BLOCK_D, UPCAST, PRECISION,
    )


@triton.jit
def decode_attention_combine_trt(
    part, lse,  # workspace inputs
    n_splits,  # int32 scalar
    out,  # output
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grid (B, H)
    heads = tl.num_programs(1)
    decode_attention_combine_kernel(part, lse, out, HEAD_DIM, n_splits, heads * HEAD_DIM, HEAD_DIM, BLOCK_S, BLOCK_D)
