"""Dense projection y = x @ W.T (+ bias) for a few rows of x (decode, batch 1..16), in Triton, beside its reference.

At decode batches a dense projection is a weight stream: every weight is read once and used for at most 8 rows, so the
kernel is built for HBM bandwidth, not FLOPs. Grid (N / BLOCK_N, SPLIT_K): each program streams BLOCK_N weight rows
over its share of K in (BLOCK_N, BLOCK_K) tiles (wide contiguous loads along K) and multiplies them with all M rows of
x at once: for one row with fp32 FMAs into a (1, BLOCK_N, BLOCK_K) accumulator reduced over K only at the end; for
several rows (USE_DOT) with tl.dot on x padded to BLOCK_M >= 16 rows (the MMA work is free next to the weight stream,
and Triton pipelines the loads that feed a dot).

Short-and-wide matrices (out_proj, x_proj: few rows, long K) give too few programs to keep every SM streaming, so K is
split: each of the SPLIT_K programs of a row block writes its fp32 partial sums to a workspace and bumps a per-block
arrival counter; the last to arrive adds the partials in a fixed order (deterministic) and writes y, then resets the
counter to 0, so the counters are always zero between launches (no memset launch; CUDA-graph safe). The counters are
one small zeroed int32 buffer per device, shared by all launches: launches on one stream run one after another, so
they never overlap (do not run split-K launches concurrently on several streams).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .common import (
    TARGET_PROGRAMS,
    cdiv,
    dot_precision,
    dot_upcast,
    fsum,
    l2_prefetch,
    l2_prefetch_args,
    next_pow2,
    pdl_launch,
    pdl_wait,
    sigmoid,
)
from .interpret import is_interpreted, kernel_for

MAX_ROWS = 16  # rows of x one launch takes (the accumulator holds all of them); callers use cuBLAS above
# Split-K is only chosen while the row blocks alone give fewer than TARGET_PROGRAMS programs, so the number of row
# blocks that need an arrival counter is bounded by this.
COUNTER_SLOTS = 1024
# One row of x on a GPU: (widest BLOCK_N, BLOCK_K, warps or None = 8 from 4096 tile elements, else 4); BLOCK_N halves
# (down to 4) until there are TARGET_PROGRAMS programs. Measured inside whole 2.8B batch-1 decode steps on the H100
# (the decode-tile sweep, removed after commit 14b6ead; results/archive/sweep_decode_*tiles_*.json): (8, 512, 4 warps)
# 0.808-0.811 ms against 0.856 ms for the earlier (16, 512, 8 warps), whose 113 registers a thread left 2 programs
# an SM, so in_proj's 368 programs took 1.4 waves.
ROW_TILE = (8, 512, 4)
_counters: dict = {}


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K), weight (N, K), bias (N,) or None -> x @ weight.T + bias in x.dtype, computed in fp32."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


@triton.jit
def _conv_epilogue(out, offs_m, mask_m, offs_n, mask_n, y_dtype, cs_ptr, cw_ptr, cb_ptr, conv_dim,
                   s_cs_b, s_cs_d, s_cs_k, s_cw_d, s_cw_k, CONV_K: tl.constexpr, HAS_CONV_BIAS: tl.constexpr):
    """Mamba's decode conv on the projection's first conv_dim outputs (in_proj's x half), in the GEMV's epilogue:
    the window (conv state (M, conv_dim, CONV_K) fp32, then this step's output rounded to the model dtype, as a
    separate projection would store it) times the taps, + bias, SiLU; the state shifts by one in place. A channel
    belongs to exactly one program (no split-K here), so its state is read and written by that program alone.
    Returns out with those columns replaced by the conv output; the others (z) pass through."""
    conv_cols = offs_n < conv_dim
    m2 = mask_m[:, None] & (mask_n & conv_cols)[None, :]
    new = out.to(y_dtype).to(tl.float32)
    rows = cs_ptr + offs_m.to(tl.int64)[:, None] * s_cs_b + offs_n[None, :] * s_cs_d
    acc = new * tl.load(cw_ptr + offs_n * s_cw_d + (CONV_K - 1) * s_cw_k, mask=mask_n & conv_cols,
                        other=0.0).to(tl.float32)[None, :]
    if HAS_CONV_BIAS:
        acc += tl.load(cb_ptr + offs_n, mask=mask_n & conv_cols, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(CONV_K - 1):
        old = tl.load(rows + (k + 1) * s_cs_k, mask=m2, other=0.0)
        acc += old * tl.load(cw_ptr + offs_n * s_cw_d + k * s_cw_k, mask=mask_n & conv_cols,
                             other=0.0).to(tl.float32)[None, :]
    tl.debug_barrier()  # every thread has read the old window before any thread shifts it
    for k in tl.static_range(CONV_K - 1):  # the state keeps the last CONV_K inputs, this step's the newest
        tl.store(rows + k * s_cs_k, tl.load(rows + (k + 1) * s_cs_k, mask=m2, other=0.0), mask=m2)
        tl.debug_barrier()
    tl.store(rows + (CONV_K - 1) * s_cs_k, new, mask=m2)
    return tl.where(conv_cols[None, :], acc * sigmoid(acc), out)


@triton.jit
def _sparsify(xv, mask, mode, threshold, SPARSIFY: tl.constexpr):
    """SCAP's input sparsifier on a loaded x tile (when SPARSIFY): (x − mode) where |x − mode| > threshold else 0,
    fp32 math, rounded to x's dtype (what the reference model's sparse linear multiplies); masked entries stay 0."""
    if SPARSIFY:
        xc = xv.to(tl.float32) - mode
        xv = tl.where((tl.abs(xc) > threshold) & mask, xc, 0.0).to(xv.dtype)
    return xv


@triton.jit
def gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, count_ptr,
    M, N, K, K_PER_SPLIT,
    s_xm, s_wn, s_ym,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    PDL: tl.constexpr = False,
    cs_ptr=None, cw_ptr=None, cb_ptr=None, conv_dim=0, s_cs_b=0, s_cs_d=0, s_cs_k=0, s_cw_d=0, s_cw_k=0,
    CONV_K: tl.constexpr = 0, HAS_CONV_BIAS: tl.constexpr = False,
    pf_ptr=None, pf_share=0, pf_piece=0, PREFETCH: tl.constexpr = False,
    sp_mode=0.0, sp_threshold=0.0, SPARSIFY: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * s_wn
    x_rows = x_ptr + offs_m[:, None] * s_xm
    k_start = pid_k * K_PER_SPLIT  # K_PER_SPLIT is a multiple of BLOCK_K: the splits never overlap
    # The first weight tile is loaded before pdl_wait (weights are constants): under PDL its HBM latency overlaps the
    # previous kernel's tail; without PDL the wait is a no-op and this is simply the loop's first iteration, peeled.
    k_first = k_start + tl.arange(0, BLOCK_K)
    w_first = tl.load(w_rows + k_first[None, :], mask=mask_n[:, None] & (k_first < K)[None, :], other=0.0)
    if PREFETCH:  # a weight of a later kernel into L2 (a hint; see common.l2_prefetch)
        l2_prefetch(pf_ptr, pid_n + pid_k * tl.num_programs(0), pf_share, pf_piece)
    pdl_wait(PDL)
    x_first_mask = mask_m[:, None] & (k_first < K)[None, :]
    x_first = _sparsify(tl.load(x_rows + k_first[None, :], mask=x_first_mask, other=0.0), x_first_mask, sp_mode,
                        sp_threshold, SPARSIFY)
    if USE_DOT:  # several rows of x: tensor-core MMA on x padded to BLOCK_M >= 16 rows; its loads are pipelined
        if UPCAST:
            w_first, x_first = w_first.to(tl.float32), x_first.to(tl.float32)
        acc2 = tl.dot(x_first, tl.trans(w_first), tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32),
                      input_precision=PRECISION)
        for k0 in range(BLOCK_K, K_PER_SPLIT, BLOCK_K):
            kk = k_start + k0 + tl.arange(0, BLOCK_K)
            mk = kk < K
            w = tl.load(w_rows + kk[None, :], mask=mask_n[:, None] & mk[None, :], other=0.0)
            xv = _sparsify(tl.load(x_rows + kk[None, :], mask=mask_m[:, None] & mk[None, :], other=0.0),
                           mask_m[:, None] & mk[None, :], sp_mode, sp_threshold, SPARSIFY)
            if UPCAST:
                w, xv = w.to(tl.float32), xv.to(tl.float32)
            acc2 = tl.dot(xv, tl.trans(w), acc2, input_precision=PRECISION)
        out = acc2
    else:  # one row: fp32 FMAs into a (BLOCK_M, BLOCK_N, BLOCK_K) accumulator, reduced over K once at the end
        acc = w_first.to(tl.float32)[None, :, :] * x_first.to(tl.float32)[:, None, :]
        for k0 in range(BLOCK_K, K_PER_SPLIT, BLOCK_K):
            kk = k_start + k0 + tl.arange(0, BLOCK_K)
            mk = kk < K
            w = tl.load(w_rows + kk[None, :], mask=mask_n[:, None] & mk[None, :], other=0.0).to(tl.float32)
            xv = _sparsify(tl.load(x_rows + kk[None, :], mask=mask_m[:, None] & mk[None, :], other=0.0),
                           mask_m[:, None] & mk[None, :], sp_mode, sp_threshold, SPARSIFY).to(tl.float32)
            acc += w[None, :, :] * xv[:, None, :]
        out = fsum(acc, 2)  # (BLOCK_M, BLOCK_N)
    mask = mask_m[:, None] & mask_n[None, :]
    y_at = y_ptr + offs_m[:, None] * s_ym + offs_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            out += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if CONV_K > 0:
            out = _conv_epilogue(out, offs_m, mask_m, offs_n, mask_n, x_ptr.dtype.element_ty, cs_ptr, cw_ptr, cb_ptr,
                                 conv_dim, s_cs_b, s_cs_d, s_cs_k, s_cw_d, s_cw_k, CONV_K, HAS_CONV_BIAS)
        # rounded to x's dtype first: an fp32 y holds what a model-dtype projection then .float() would
        tl.store(y_at, out.to(x_ptr.dtype.element_ty).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        part_at = part_ptr + offs_m[:, None] * N + offs_n[None, :]  # workspace (SPLIT_K, M, N) fp32
        tl.store(part_at + pid_k * M * N, out, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the arrival is counted (release, gpu scope)
        arrived = tl.atomic_add(count_ptr + pid_n, 1)
        if arrived == SPLIT_K - 1:  # the last program of this row block: add the partials in split order
            total = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
            for s in range(SPLIT_K):
                total += tl.load(part_at + s * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(y_at, total.to(x_ptr.dtype.element_ty).to(y_ptr.dtype.element_ty), mask=mask)
            tl.store(count_ptr + pid_n, 0)


def launch_config(shapes, dtypes=None, interpret: bool = False, split_k: bool = True) -> dict:
    """shapes: (x (M, K), weight (N, K)). A plain function of the shapes: grid (N / BLOCK_N, SPLIT_K), warps, stages,
    constexprs, and K_PER_SPLIT (a runtime argument). One row of x: fp32 FMAs into a ROW_TILE accumulator (8 x 512
    at 4 warps, see ROW_TILE), BLOCK_N shrinks to 4 rows before K splits.
    Several rows: tl.dot on x padded to 16 rows, (32 x 128) weight tiles, 4 stages (the expert GEMM's decode tile).
    Then K splits until there are TARGET_PROGRAMS programs (unless split_k=False: the fused conv epilogue needs every
    output column finished by one program). The interpreter takes narrow K tiles so that CPU tests
    cover several chunks and splits."""
    M, K = shapes[0]
    N = shapes[1][0]
    if M > MAX_ROWS:
        raise ValueError(f"gemv: {M} rows of x, at most {MAX_ROWS} (use a GEMM)")
    use_dot = M > 1
    block_m = max(16, next_pow2(M)) if use_dot else 1
    stages = 1
    if interpret:
        block_k, block_n, warps = 32, 16, 4
        chunks = cdiv(K, block_k)
        split = min(chunks, 3) if split_k else 1
    else:
        if use_dot:
            block_k, block_n, warps, stages = 128, 32, 4, 4
        else:
            block_n, block_k, warps = ROW_TILE
            block_k = min(block_k, max(64, next_pow2(K)))
            while block_n > 4 and cdiv(N, block_n) < TARGET_PROGRAMS:
                block_n //= 2
            warps = warps or (8 if block_n * block_k >= 4096 else 4)
        chunks = cdiv(K, block_k)
        split = min(chunks, max(1, cdiv(TARGET_PROGRAMS, cdiv(N, block_n)))) if split_k else 1
    per_split = cdiv(chunks, split)
    split = cdiv(chunks, per_split)  # no empty splits
    return {"kernel": "gemv_kernel", "grid": (cdiv(N, block_n), split), "num_warps": warps, "num_stages": stages,
            "k_per_split": per_split * block_k,
            "constexprs": {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split,
                           "USE_DOT": use_dot}}


def _counter_buffer(device) -> torch.Tensor:
    key = str(device)
    if key not in _counters:  # created at the first (warm-up) launch, never inside a CUDA-graph capture
        _counters[key] = torch.zeros(COUNTER_SLOTS, dtype=torch.int32, device=device)
    return _counters[key]


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, config: dict | None = None,
         out: torch.Tensor | None = None, conv: tuple | None = None, prefetch: tuple | None = None,
         sparsify: tuple | None = None) -> torch.Tensor:
    """Same contract as gemv_ref: x (M, K) with M <= MAX_ROWS, weight (N, K), bias (N,) -> (M, N) in x.dtype, fp32
    accumulation. Rows of x and weight must be contiguous along K (row strides are free).
    conv = (conv_state (M, C, d_conv) fp32, conv_weight (C, d_conv), conv_bias (C,) or None): Mamba's decode step
    fused in (in_proj): the first C outputs go through causal_conv1d_update with SiLU (conv_state shifted in place)
    and come back as its output; the rest (z) as projected. Equal to gemv_ref then causal_conv1d_update_ref.
    prefetch = (tensor, nbytes): the programs also warm L2 with that many leading bytes of a weight that a later kernel
    reads (Hopper only; see common.l2_prefetch_args).
    sparsify = (mode, threshold): SCAP's input sparsifier applied to x as it is loaded (a SCAP site that the per-site
    choice runs on the dense kernel: runtime/fast_sparse.py): equal to gemv_ref(sparsify_ref(x, mode, threshold), ...).
    out: (M, N), x.dtype or fp32; an fp32 out holds the x.dtype result widened (what gemv(...).float() gives, without
    the extra launch: the LM head writes its fp32 logits buffer directly)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"gemv: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit (x (M, K), "
                         f"weight (N, K))")
    M, K = x.shape
    N = weight.shape[0]
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"gemv: bias {tuple(bias.shape)} for {N} output features")
    if x.stride(1) != 1:
        x = x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    if out is not None and (out.shape != (M, N) or out.dtype not in (x.dtype, torch.float32) or out.stride(1) != 1):
        raise ValueError(f"gemv: out {out.dtype} {tuple(out.shape)} must be ({M}, {N}), {x.dtype} or fp32, with "
                         f"contiguous rows")
    y = out if out is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    kernel = kernel_for(gemv_kernel, x)
    cfg = config or launch_config((x.shape, weight.shape), interpret=is_interpreted(kernel), split_k=conv is None)
    conv_args = {}
    if conv is not None:
        conv_args = _conv_arguments(conv, M, N)
        if cfg["constexprs"]["SPLIT_K"] != 1:
            raise ValueError("gemv: the fused conv needs a launch config without split-K")
    split = cfg["constexprs"]["SPLIT_K"]
    if split > 1:
        if cfg["grid"][0] > COUNTER_SLOTS:
            raise ValueError(f"gemv: split-K over {cfg['grid'][0]} row blocks, at most {COUNTER_SLOTS}")
        part = torch.empty(split, M, N, dtype=torch.float32, device=x.device)
        counters = _counter_buffer(x.device)
    else:
        part = counters = y  # unused
    kernel[cfg["grid"]](
        x, weight, bias if bias is not None else y, y, part, counters,
        M, N, K, cfg["k_per_split"], x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, UPCAST=dot_upcast(x.dtype, is_interpreted(kernel)), PRECISION=dot_precision(x.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **cfg["constexprs"], **pdl_launch(x), **conv_args,
        **_prefetch_arguments(prefetch, cfg),
        **({} if sparsify is None else {"sp_mode": float(sparsify[0]), "sp_threshold": float(sparsify[1]),
                                        "SPARSIFY": True}),
    )
    return y


def _prefetch_arguments(prefetch, cfg) -> dict:
    if prefetch is None:
        return {}
    region, nbytes = prefetch
    return l2_prefetch_args(region, nbytes, cfg["grid"][0] * cfg["grid"][1], cfg["num_warps"])


def _conv_arguments(conv, M: int, N: int) -> dict:
    state, weight, bias = conv
    C, d_conv = weight.shape
    if state.dtype != torch.float32 or state.shape != (M, C, d_conv) or C > N or (bias is not None and
                                                                               bias.shape != (C,)):
        raise ValueError(f"gemv: conv state {state.dtype} {tuple(state.shape)} / weight {tuple(weight.shape)} do not "
                         f"fit {M} rows and {N} outputs (state fp32 (M, C, d_conv), C <= N)")
    return {"cs_ptr": state, "cw_ptr": weight, "cb_ptr": bias if bias is not None else weight, "conv_dim": C,
            "s_cs_b": state.stride(0), "s_cs_d": state.stride(1), "s_cs_k": state.stride(2),
            "s_cw_d": weight.stride(0), "s_cw_k": weight.stride(1), "CONV_K": d_conv,
            "HAS_CONV_BIAS": bias is not None}
