"""The MoE expert feed-forward (gated MLP per expert, top-k combine) in Triton, beside its reference.

w1 (E, 2F, d) = per expert [gate; up], w2 (E, d, F). A "pair" p = token * k + slot is one (token, chosen expert).
Two launches per MoE layer cover all experts, and only the chosen experts' weights are read:
  fc1: h[p] = act(x[tok] @ w1[e, :F].T) * (x[tok] @ w1[e, F:].T)   -> (P, F) in x.dtype
  fc2: y[tok] (+)= weight[p] * (h[p] @ w2[e].T)                     -> top-1: straight into (T, d);
                                                                       top-k: (P, d) fp32, then summed over the k slots
Two shapes of launch, chosen from shapes alone (`launch_config`):
- GEMV (few pairs, decode): grid (P, N blocks), the pair index fastest so that programs reading the same expert rows
  run together (duplicates hit L2). Each program reads its pair's expert rows; at batch 1 exactly one expert is read.
- grouped GEMM (prefill, large batches): moe_align groups the pairs by expert into BLOCK_M-row blocks; grid
  (blocks, N blocks), each block gathers its tokens' rows and multiplies by its one expert's weights with tl.dot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mambadeploy.models.ref_ops import expert_gather_ref  # noqa: F401  (the reference, re-exported)

from .common import (
    ACTIVATION_CODES,
    activate,
    dot_precision,
    dot_upcast,
    fsum,
    next_pow2,
    pdl_launch,
    pdl_wait,
)
from .gemv import _sparsify
from .interpret import is_interpreted, kernel_for
from .moe_routing import moe_align

# Pairs (tokens * k) up to this many use the GEMV launch; above, the grouped GEMM. Measured on the H100 (2.8B shapes):
# with 8 pairs the GEMV re-read the shared expert once per pair (55 us for one expert's 34 MB, against 17 us for one
# pair), so only a single pair — batch-1 top-1 decode — takes the GEMV.
GEMV_MAX_PAIRS = 1
# GEMV tiles on a GPU, (BLOCK_N, BLOCK_K, warps), measured inside whole 2.8B batch-1 decode steps on the H100
# (the decode-tile sweep, removed after commit 14b6ead; results/archive/sweep_decode_{moe,fc1}_tiles_*.json): fc1
# (8, 512, 4) 0.793 ms against 0.804-0.809 ms for the earlier (16, 512, 8) (230 registers a thread: one program an
# SM, 242 programs in 1.8 waves); fc2 (8, 1024, 8) stays (every other tile tried was slower).
GEMV_FC1_TILE = (8, 512, 4)
GEMV_FC2_TILE = (8, 1024, 8)


# --------------------------------------------------------------------------- GEMV (decode)
@triton.jit
def moe_gemv_fc1_kernel(
    x_ptr, w1_ptr, experts_ptr, h_ptr,
    F, d,
    s_x_t, s_w_e, s_w_f, s_w_d, s_h_p,
    TOP_K: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr = False,
    b_ptr=None, sp_mode=0.0, sp_threshold=0.0, HAS_BIAS: tl.constexpr = False, SPARSIFY: tl.constexpr = False,
):
    """SPARSIFY / HAS_BIAS: a SCAP-sparse fc1 on the dense kernel (x sparsified as loaded, the folded bias (E, 2F)
    added to gate and up before the activation)."""
    pair = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < F
    pdl_wait(PDL)  # (the expert, hence every weight this program reads, comes from the router kernel)
    e = tl.load(experts_ptr + pair).to(tl.int64)
    x_row = x_ptr + (pair // TOP_K).to(tl.int64) * s_x_t
    gate_rows = w1_ptr + e * s_w_e + offs_n[:, None] * s_w_f
    up_rows = gate_rows + F * s_w_f
    acc_g = tl.full((BLOCK_N, BLOCK_K), 0.0, tl.float32)
    acc_u = tl.full((BLOCK_N, BLOCK_K), 0.0, tl.float32)
    for k0 in range(0, d, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mk = kk < d
        xv = _sparsify(tl.load(x_row + kk, mask=mk, other=0.0), mk, sp_mode, sp_threshold, SPARSIFY).to(tl.float32)
        m = mask_n[:, None] & mk[None, :]
        acc_g += tl.load(gate_rows + kk[None, :] * s_w_d, mask=m, other=0.0).to(tl.float32) * xv[None, :]
        acc_u += tl.load(up_rows + kk[None, :] * s_w_d, mask=m, other=0.0).to(tl.float32) * xv[None, :]
    gate, up = fsum(acc_g, 1), fsum(acc_u, 1)
    if HAS_BIAS:
        gate += tl.load(b_ptr + e * (2 * F) + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        up += tl.load(b_ptr + e * (2 * F) + F + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    h = activate(gate, ACTIVATION) * up
    tl.store(h_ptr + pair.to(tl.int64) * s_h_p + offs_n, h.to(h_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def moe_gemv_fc2_kernel(
    h_ptr, w2_ptr, experts_ptr, weights_ptr, y_ptr,
    d, F,
    s_h_p, s_w_e, s_w_d, s_w_f, s_y_r,
    TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False,
    b_ptr=None, sp_mode=0.0, sp_threshold=0.0, HAS_BIAS: tl.constexpr = False, SPARSIFY: tl.constexpr = False,
):
    """SPARSIFY / HAS_BIAS: a SCAP-sparse fc2 on the dense kernel (h sparsified as loaded, the folded bias (E, d)
    added before the routing weight)."""
    pair = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < d
    # The expert id comes from the router kernel, two launches back (router -> fc1 -> fc2): under PDL, fc2 starts only
    # after every fc1 program has passed its own wait, i.e. after the router finished, so the id may be read before
    # fc2's wait -- from L2 (.cg), the coherent level -- and with it the first tile of the expert's weights.
    e = tl.load(experts_ptr + pair, cache_modifier=".cg").to(tl.int64)
    h_row = h_ptr + pair.to(tl.int64) * s_h_p
    w_rows = w2_ptr + e * s_w_e + offs_n[:, None] * s_w_d
    k_first = tl.arange(0, BLOCK_K)
    w_first = tl.load(w_rows + k_first[None, :] * s_w_f, mask=mask_n[:, None] & (k_first < F)[None, :], other=0.0)
    pdl_wait(PDL)
    h_first = _sparsify(tl.load(h_row + k_first, mask=k_first < F, other=0.0), k_first < F, sp_mode, sp_threshold,
                        SPARSIFY)
    acc = w_first.to(tl.float32) * h_first.to(tl.float32)[None, :]
    for k0 in range(BLOCK_K, F, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mk = kk < F
        hv = _sparsify(tl.load(h_row + kk, mask=mk, other=0.0), mk, sp_mode, sp_threshold, SPARSIFY).to(tl.float32)
        acc += tl.load(w_rows + kk[None, :] * s_w_f, mask=mask_n[:, None] & mk[None, :], other=0.0).to(tl.float32) \
            * hv[None, :]
    out = fsum(acc, 1)
    if HAS_BIAS:
        out += tl.load(b_ptr + e * d + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    out = out * tl.load(weights_ptr + pair)
    # row = pair: with top-1 that is the token's row of y (T, d); with top-k the pair's row of the fp32 (P, d) buffer
    tl.store(y_ptr + pair.to(tl.int64) * s_y_r + offs_n, out.to(y_ptr.dtype.element_ty), mask=mask_n)


# --------------------------------------------------------------------------- grouped GEMM (prefill, large batch)
@triton.jit
def _block_pairs(sorted_ptr, block_expert_ptr, P, BLOCK_M: tl.constexpr):
    """The grouped GEMM's row block (program_id 0): its expert (E for blocks past the last expert's segment, which
    do nothing), its slots in sorted_pairs, the pairs there and which of them are real (padding rows are not)."""
    pid_m = tl.program_id(0)
    e = tl.load(block_expert_ptr + pid_m)
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ptr + slots)
    return e, slots, pairs, pairs < P


@triton.jit
def moe_gemm_fc1_kernel(
    x_ptr, w1_ptr, sorted_ptr, block_expert_ptr, h_ptr,
    P, F, d, E,
    s_x_t, s_w_e, s_w_f, s_w_d, s_h_p,
    TOP_K: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    b_ptr=None, sp_mode=0.0, sp_threshold=0.0, HAS_BIAS: tl.constexpr = False, SPARSIFY: tl.constexpr = False,
):
    """SPARSIFY / HAS_BIAS: as moe_gemv_fc1_kernel's (a SCAP-sparse fc1 on the dense kernel, decode batches)."""
    e, _, pairs, valid = _block_pairs(sorted_ptr, block_expert_ptr, P, BLOCK_M)
    if e < E:
        tok = (pairs // TOP_K).to(tl.int64)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < F
        w_base = w1_ptr + e.to(tl.int64) * s_w_e
        acc_g = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        acc_u = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k0 in range(0, d, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            mk = kk < d
            a = _sparsify(tl.load(x_ptr + tok[:, None] * s_x_t + kk[None, :], mask=valid[:, None] & mk[None, :],
                                  other=0.0), valid[:, None] & mk[None, :], sp_mode, sp_threshold, SPARSIFY)
            m = mk[:, None] & mask_n[None, :]
            # weight tiles (BLOCK_K, BLOCK_N) of the expert's gate rows and up rows
            wg = tl.load(w_base + offs_n[None, :] * s_w_f + kk[:, None] * s_w_d, mask=m, other=0.0)
            wu = tl.load(w_base + (offs_n + F)[None, :] * s_w_f + kk[:, None] * s_w_d, mask=m, other=0.0)
            if UPCAST:
                a, wg, wu = a.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
            acc_g = tl.dot(a, wg, acc_g, input_precision=PRECISION)
            acc_u = tl.dot(a, wu, acc_u, input_precision=PRECISION)
        if HAS_BIAS:
            acc_g += tl.load(b_ptr + e.to(tl.int64) * (2 * F) + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            acc_u += tl.load(b_ptr + e.to(tl.int64) * (2 * F) + F + offs_n, mask=mask_n,
                             other=0.0).to(tl.float32)[None, :]
        h = activate(acc_g, ACTIVATION) * acc_u
        tl.store(h_ptr + pairs.to(tl.int64)[:, None] * s_h_p + offs_n[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=valid[:, None] & mask_n[None, :])


@triton.jit
def _store_weighted_rows(acc, pairs, valid, offs_n, mask_n, weights_ptr, y_ptr, s_y_r):
    """fc2's epilogue: each pair's row times its routing weight, stored at row = pair (the token's row of y with
    top-1, the pair's row of the fp32 (P, d) buffer with top-k); padding rows (not valid) are skipped."""
    out = acc * tl.load(weights_ptr + pairs, mask=valid, other=0.0)[:, None]
    tl.store(y_ptr + pairs.to(tl.int64)[:, None] * s_y_r + offs_n[None, :], out.to(y_ptr.dtype.element_ty),
             mask=valid[:, None] & mask_n[None, :])


@triton.jit
def moe_gemm_fc2_kernel(
    h_ptr, w2_ptr, sorted_ptr, block_expert_ptr, weights_ptr, y_ptr,
    P, d, F, E,
    s_h_p, s_w_e, s_w_d, s_w_f, s_y_r,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    b_ptr=None, sp_mode=0.0, sp_threshold=0.0, HAS_BIAS: tl.constexpr = False, SPARSIFY: tl.constexpr = False,
):
    """SPARSIFY / HAS_BIAS: as moe_gemv_fc2_kernel's (a SCAP-sparse fc2 on the dense kernel, decode batches)."""
    e, _, pairs, valid = _block_pairs(sorted_ptr, block_expert_ptr, P, BLOCK_M)
    if e < E:
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < d
        w_base = w2_ptr + e.to(tl.int64) * s_w_e
        h_rows = h_ptr + pairs.to(tl.int64)[:, None] * s_h_p
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k0 in range(0, F, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            mk = kk < F
            a = _sparsify(tl.load(h_rows + kk[None, :], mask=valid[:, None] & mk[None, :], other=0.0),
                          valid[:, None] & mk[None, :], sp_mode, sp_threshold, SPARSIFY)
            w = tl.load(w_base + offs_n[None, :] * s_w_d + kk[:, None] * s_w_f, mask=mk[:, None] & mask_n[None, :],
                        other=0.0)
            if UPCAST:
                a, w = a.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + e.to(tl.int64) * d + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        _store_weighted_rows(acc, pairs, valid, offs_n, mask_n, weights_ptr, y_ptr, s_y_r)


# --------------------------------------------------------------------------- grouped GEMM, weights by TMA
# The same grouping, on Hopper's tensor memory accelerator: the expert weights (and fc2's h) arrive as whole tiles
# through host-built tensor descriptors instead of per-thread pointer loads. fc1 writes h in the grouped order (row =
# slot of sorted_pairs, padding rows included: their x rows load as zeros), so fc2's h tiles are contiguous too.
# Weight tiles may run past an expert's rows into the next expert's (or past the end: zero-filled); those output
# columns are masked at the store.
@triton.jit
def moe_gemm_fc1_tma_kernel(
    x_ptr, w1_desc, sorted_ptr, block_expert_ptr, h_ptr,
    P, F, d, E,
    s_x_t, s_h_r,
    TOP_K: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    e, slots, pairs, valid = _block_pairs(sorted_ptr, block_expert_ptr, P, BLOCK_M)
    if e < E:
        tok = (pairs // TOP_K).to(tl.int64)
        n0 = tl.program_id(1) * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        row_gate = e * 2 * F + n0
        acc_g = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        acc_u = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k0 in range(0, d, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_ptr + tok[:, None] * s_x_t + kk[None, :], mask=valid[:, None] & (kk < d)[None, :],
                        other=0.0)
            wg = w1_desc.load([row_gate, k0])  # (BLOCK_N, BLOCK_K)
            wu = w1_desc.load([row_gate + F, k0])
            if UPCAST:
                a, wg, wu = a.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
            acc_g = tl.dot(a, tl.trans(wg), acc_g, input_precision=PRECISION)
            acc_u = tl.dot(a, tl.trans(wu), acc_u, input_precision=PRECISION)
        h = activate(acc_g, ACTIVATION) * acc_u
        tl.store(h_ptr + slots.to(tl.int64)[:, None] * s_h_r + offs_n[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=(offs_n < F)[None, :])


@triton.jit
def moe_gemm_fc2_tma_kernel(
    h_desc, w2_desc, sorted_ptr, block_expert_ptr, weights_ptr, y_ptr,
    P, d, F, E,
    s_y_r,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    e, _, pairs, valid = _block_pairs(sorted_ptr, block_expert_ptr, P, BLOCK_M)
    if e < E:
        n0 = tl.program_id(1) * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k0 in range(0, F, BLOCK_K):
            a = h_desc.load([tl.program_id(0) * BLOCK_M, k0])  # (BLOCK_M, BLOCK_K) of the grouped h
            w = w2_desc.load([e * d + n0, k0])  # (BLOCK_N, BLOCK_K)
            if UPCAST:
                a, w = a.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)
        _store_weighted_rows(acc, pairs, valid, offs_n, offs_n < d, weights_ptr, y_ptr, s_y_r)


# --------------------------------------------------------------------------- launch configs
def launch_config(shapes, dtypes=None, interpret: bool = False, tma: bool = False) -> dict:
    """shapes: (x (T, d), w1 (E, 2F, d), w2 (E, d, F), experts (T, k), weights (T, k)) — the TopKExpertGather order.
    Returns {"path": "gemv" | "gemm" | "gemm_tma", "fc1": {...}, "fc2": {...}} (+ "align" for the GEMMs); each launch
    has grid, num_warps, num_stages and constexprs; workspaces: h (P, F) (gemm_tma: (n_blocks * BLOCK_M, F)) in
    x.dtype, and for top-k > 1 a (P, d) fp32 output. tma: the prefill GEMM may take its weights by TMA (the caller
    knows the GPU can: `tma_usable`)."""
    T, d = shapes[0]
    E, two_f, _ = shapes[1]
    F = two_f // 2
    k = shapes[3][1]
    P = T * k
    if P <= GEMV_MAX_PAIRS:
        if interpret:
            n1, k1 = min(next_pow2(F), 128), min(next_pow2(d), 256)
            n2, k2 = min(next_pow2(d), 128), min(next_pow2(F), 256)
            w1 = w2 = 4
        else:
            (n1, k1, w1), (n2, k2, w2) = GEMV_FC1_TILE, GEMV_FC2_TILE
        return {
            "path": "gemv",
            "fc1": {"kernel": "moe_gemv_fc1_kernel", "grid": (P, triton.cdiv(F, n1)), "num_warps": w1,
                    "num_stages": 3, "constexprs": {"BLOCK_N": n1, "BLOCK_K": k1}},
            "fc2": {"kernel": "moe_gemv_fc2_kernel", "grid": (P, triton.cdiv(d, n2)), "num_warps": w2,
                    "num_stages": 3, "constexprs": {"BLOCK_N": n2, "BLOCK_K": k2}},
        }
    # tiles: (BLOCK_M, fc1 (BLOCK_N, BLOCK_K, warps, stages), fc2 (...)); the best of the H100 sweep per regime:
    # decode batches (P <= 16 E: 16-row blocks, weight-streaming) and prefill (128-row blocks)
    if interpret:
        block_m, t1, t2 = 16, (min(next_pow2(F), 64), 32, 4, 1), (min(next_pow2(d), 64), 32, 4, 1)
    elif P <= 16 * E:
        block_m, t1, t2 = 16, (64, 128, 4, 4), (32, 256, 4, 3)
    elif dtypes is not None and dtypes[0] == torch.float32:
        # fp32 operands take 2x the shared memory a stage: the bf16 prefill tiles do not fit (seen on the H100)
        block_m, t1, t2 = 64, (64, 32, 4, 3), (64, 32, 4, 3)
    else:  # prefill: the H100 sweep at 2048 tokens, CUDA-graph timing (results/archive/sweep_moe_tma_*.json):
        # TMA 193 us, pointer loads 201 us with these tiles; the pointer path's earlier fc2 tile (128, 64, 8, 4) 211 us
        block_m, t1, t2 = 128, (128, 64, 8, 4), (256, 64, 8, 3)
    n_blocks = triton.cdiv(P, block_m) + E
    prefill = not interpret and P > 16 * E
    return {
        "path": "gemm_tma" if tma and prefill else "gemm",
        "align": {"kernel": "moe_align_kernel", "block_m": block_m, "n_blocks": n_blocks},
        "fc1": {"kernel": "moe_gemm_fc1_kernel", "grid": (n_blocks, triton.cdiv(F, t1[0])), "num_warps": t1[2],
                "num_stages": t1[3], "constexprs": {"BLOCK_M": block_m, "BLOCK_N": t1[0], "BLOCK_K": t1[1]}},
        "fc2": {"kernel": "moe_gemm_fc2_kernel", "grid": (n_blocks, triton.cdiv(d, t2[0])), "num_warps": t2[2],
                "num_stages": t2[3], "constexprs": {"BLOCK_M": block_m, "BLOCK_N": t2[0], "BLOCK_K": t2[1]}},
    }


def tma_usable(x, w1, w2) -> bool:
    """Whether the grouped GEMM can take its tiles by TMA here: a Hopper-or-later GPU, 16-bit operands, contiguous
    weights and rows of a multiple of 16 bytes (what a tensor descriptor needs)."""
    if not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16) or w1.dtype != x.dtype or w2.dtype != x.dtype:
        return False
    row_bytes = (w1.shape[2] * w1.element_size(), w2.shape[2] * w2.element_size())
    if not (w1.is_contiguous() and w2.is_contiguous()) or row_bytes[0] % 16 or row_bytes[1] % 16:
        return False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(x.device)[0] >= 9


def expert_gather(x, w1, w2, experts, weights, activation, *, config: dict | None = None,
                  sparse: tuple | None = None):
    """Same contract as expert_gather_ref: x (T, d); w1 (E, 2F, d); w2 (E, d, F); experts (T, k) int; weights (T, k).
    Returns sum_j weights[:, j] * ffn_{experts[:, j]}(x) as (T, d) in x.dtype (fp32 accumulation).
    sparse = (fc1, fc2), each (mode, threshold, folded bias (E, out) or None) or None: SCAP's sparsifiers on fc1's and
    fc2's inputs (models/sparsity.sparse_moe_ref's math on the dense kernels: a SCAP expert site that torch-fast's
    per-site choice runs dense): the GEMV path and the pointer grouped GEMM (decode batches), not the TMA one."""
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"unknown activation {activation!r} (supported: {', '.join(ACTIVATION_CODES)})")
    T, d = x.shape
    E, two_f, d_w = w1.shape
    F = two_f // 2
    k = experts.shape[1]
    if d_w != d or w2.shape != (E, d, F) or experts.shape != (T, k) or weights.shape != (T, k):
        raise ValueError(f"expert_gather: x {tuple(x.shape)}, w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}, experts "
                         f"{tuple(experts.shape)}, weights {tuple(weights.shape)} do not fit together")
    P = T * k
    y = torch.empty(T, d, dtype=x.dtype, device=x.device)
    if T == 0:
        return y
    if x.stride(1) != 1:
        x = x.contiguous()
    experts = experts.contiguous()
    weights = weights.float().contiguous()
    kernel1 = kernel_for(moe_gemv_fc1_kernel, x)
    interpreted = is_interpreted(kernel1)
    cfg = config or launch_config((x.shape, w1.shape, w2.shape, experts.shape, weights.shape), (x.dtype,),
                                  interpret=interpreted, tma=tma_usable(x, w1, w2))
    out = y if k == 1 else torch.empty(P, d, dtype=torch.float32, device=x.device)
    act = ACTIVATION_CODES[activation]
    c1, c2 = cfg["fc1"], cfg["fc2"]
    if sparse is not None and cfg["path"] == "gemm_tma":
        raise ValueError(f"expert_gather: SCAP sparsifiers take the GEMV / pointer-GEMM paths, not TMA ({P} pairs)")
    sp1, sp2 = sparse or (None, None)
    if cfg["path"] == "gemv":
        h = torch.empty(P, F, dtype=x.dtype, device=x.device)
        kernel1[c1["grid"]](x, w1, experts, h, F, d, x.stride(0), *w1.stride(), h.stride(0),
                            TOP_K=k, ACTIVATION=act, num_warps=c1["num_warps"], num_stages=c1["num_stages"],
                            **c1["constexprs"], **pdl_launch(x), **_sparse_arguments(sp1))
        kernel_for(moe_gemv_fc2_kernel, x)[c2["grid"]](
            h, w2, experts, weights, out, d, F, h.stride(0), *w2.stride(), out.stride(0),
            TOP_K=k, num_warps=c2["num_warps"], num_stages=c2["num_stages"], **c2["constexprs"], **pdl_launch(x),
            **_sparse_arguments(sp2))
    else:
        _grouped_gemm(cfg, x, w1, w2, experts, weights, out, act, interpreted, sp1, sp2)
    if k > 1:
        y.copy_(out.view(T, k, d).sum(1))
    return y


def _sparse_arguments(spec) -> dict:
    """A GEMV kernel's SCAP arguments for spec = (mode, threshold, folded bias (E, out) or None), or None."""
    if spec is None:
        return {}
    mode, threshold, bias = spec
    args = {"sp_mode": float(mode), "sp_threshold": float(threshold), "SPARSIFY": True}
    if bias is not None:
        args.update(b_ptr=bias.contiguous(), HAS_BIAS=True)
    return args


def _grouped_gemm(cfg, x, w1, w2, experts, weights, out, act, interpreted, sp1=None, sp2=None):
    """The grouped-GEMM launches (paths gemm / gemm_tma) of expert_gather: pairs grouped by expert, fc1 into h, fc2
    into out."""
    T, d = x.shape
    E, two_f, _ = w1.shape
    F, k = two_f // 2, experts.shape[1]
    P = T * k
    c1, c2 = cfg["fc1"], cfg["fc2"]
    if cfg["path"] == "gemm_tma" and x.is_cuda and x.dtype == torch.float32:  # (its fp32 tiles were wrong on the H100)
        raise ValueError("expert_gather: the TMA grouped GEMM takes 16-bit operands on a GPU (see tma_usable)")
    block_m = cfg["align"]["block_m"]
    sorted_pairs, block_expert = moe_align(experts, E, block_m)
    common = {"UPCAST": dot_upcast(x.dtype, interpreted), "PRECISION": dot_precision(x.dtype)}
    if cfg["path"] == "gemm":
        h = torch.empty(P, F, dtype=x.dtype, device=x.device)
        kernel_for(moe_gemm_fc1_kernel, x)[c1["grid"]](
            x, w1, sorted_pairs, block_expert, h, P, F, d, E, x.stride(0), *w1.stride(), h.stride(0),
            TOP_K=k, ACTIVATION=act, num_warps=c1["num_warps"], num_stages=c1["num_stages"], **c1["constexprs"],
            **common, **_sparse_arguments(sp1))
        kernel_for(moe_gemm_fc2_kernel, x)[c2["grid"]](
            h, w2, sorted_pairs, block_expert, weights, out, P, d, F, E, h.stride(0), *w2.stride(), out.stride(0),
            TOP_K=k, num_warps=c2["num_warps"], num_stages=c2["num_stages"], **c2["constexprs"], **common,
            **_sparse_arguments(sp2))
    else:  # gemm_tma
        from triton.tools.tensor_descriptor import TensorDescriptor

        h = torch.empty(sorted_pairs.numel(), F, dtype=x.dtype, device=x.device)  # grouped rows, padding included
        k1, k2 = c1["constexprs"], c2["constexprs"]
        w1_desc = TensorDescriptor.from_tensor(w1.reshape(E * 2 * F, d), [k1["BLOCK_N"], k1["BLOCK_K"]])
        kernel_for(moe_gemm_fc1_tma_kernel, x)[c1["grid"]](
            x, w1_desc, sorted_pairs, block_expert, h, P, F, d, E, x.stride(0), h.stride(0),
            TOP_K=k, ACTIVATION=act, num_warps=c1["num_warps"], num_stages=c1["num_stages"], **k1, **common)
        h_desc = TensorDescriptor.from_tensor(h, [block_m, k2["BLOCK_K"]])
        w2_desc = TensorDescriptor.from_tensor(w2.reshape(E * d, F), [k2["BLOCK_N"], k2["BLOCK_K"]])
        kernel_for(moe_gemm_fc2_tma_kernel, x)[c2["grid"]](
            h_desc, w2_desc, sorted_pairs, block_expert, weights, out, P, d, F, E, out.stride(0),
            num_warps=c2["num_warps"], num_stages=c2["num_stages"], **k2, **common)
