"""MoE routing in Triton, beside its reference, and the token grouping that the grouped expert GEMM reads.

- route_kernel: one program per BLOCK_T tokens. Either reads router logits (T, E) or computes them from the hidden
  states and the router weight (fused router GEMV, fp32 accumulation), then picks experts:
  sigmoid_top1 (BlackMamba: argmax, weight = sigmoid(logit)) or softmax_topk (softmax in fp32, k x argmax, no
  renormalisation). Ties go to the smaller expert index, as torch.argmax does.
- moe_align_kernel: a single program that groups the T*k (token, slot) pairs by expert for the grouped GEMM:
  counts per expert, each expert's segment padded to a multiple of BLOCK_M, `sorted_pairs` = pair ids in expert order
  (stable), the sentinel P in padding slots, and `block_expert` = the expert of each BLOCK_M rows (>= E: unused block).
  Shapes are static (an upper bound of cdiv(P, BLOCK_M) + E blocks), so it captures in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mambadeploy.models.ref_ops import route_ref  # noqa: F401  (the reference, re-exported)

from .common import argmax, cdiv, cumsum, fmax, fsum, load_or_zeros, next_pow2, pdl_launch, pdl_wait, sigmoid
from .interpret import is_interpreted, kernel_for

ROUTERS = {"sigmoid_top1": 0, "softmax_topk": 1}


@triton.jit
def route_kernel(
    src_ptr, w_ptr, b_ptr, weights_ptr, experts_ptr,
    T, E, d,
    s_src_t, s_src_c, s_w_e, s_w_d,
    FROM_HIDDEN: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTMAX: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    mask_t = offs_t < T
    mask_e = offs_e < E
    rows = src_ptr + offs_t.to(tl.int64)[:, None] * s_src_t
    if FROM_HIDDEN:
        logits = tl.full((BLOCK_T, BLOCK_E), 0.0, tl.float32)
        for k0 in range(0, d, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            mk = kk < d
            xv = tl.load(rows + kk[None, :] * s_src_c, mask=mask_t[:, None] & mk[None, :], other=0.0).to(tl.float32)
            wv = tl.load(w_ptr + offs_e[:, None] * s_w_e + kk[None, :] * s_w_d, mask=mask_e[:, None] & mk[None, :],
                         other=0.0).to(tl.float32)
            logits += fsum(xv[:, None, :] * wv[None, :, :], 2)
        if HAS_BIAS:
            logits += tl.load(b_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)[None, :]
    else:
        logits = tl.load(rows + offs_e[None, :] * s_src_c, mask=mask_t[:, None] & mask_e[None, :],
                         other=0.0).to(tl.float32)
    _pick_experts(logits, mask_e, offs_t.to(tl.int64), mask_t, weights_ptr, experts_ptr, SOFTMAX, TOP_K)


@triton.jit
def _pick_experts(logits, mask_e, rows, mask_t, weights_ptr, experts_ptr, SOFTMAX: tl.constexpr, TOP_K: tl.constexpr):
    """logits (BLOCK_T, BLOCK_E) fp32 -> weights/experts rows (BLOCK_T,) x TOP_K (sigmoid-top1 or softmax-topk)."""
    logits = tl.where(mask_e[None, :], logits, float("-inf"))
    index = tl.full(logits.shape, 0, tl.int32) + tl.arange(0, logits.shape[1])[None, :]
    out = rows * TOP_K
    if SOFTMAX:
        p = tl.exp(logits - fmax(logits, 1)[:, None])
        p = p / fsum(p, 1)[:, None]
        for j in tl.static_range(TOP_K):
            value, idx = argmax(p, index, 1)
            tl.store(weights_ptr + out + j, value, mask=mask_t)
            tl.store(experts_ptr + out + j, idx.to(tl.int64), mask=mask_t)
            p = tl.where(index == idx[:, None], -1.0, p)
    else:
        value, idx = argmax(logits, index, 1)
        tl.store(weights_ptr + out, sigmoid(value), mask=mask_t)
        tl.store(experts_ptr + out, idx.to(tl.int64), mask=mask_t)


@triton.jit
def add_rms_norm_route_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, rw_ptr, rb_ptr, weights_ptr, experts_ptr,
    d, E, eps,
    s_x, s_r, s_o, s_ro, s_rw_e, s_rw_d,
    HAS_X: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTMAX: tl.constexpr,
    TOP_K: tl.constexpr, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr, PDL: tl.constexpr = False,
):
    """residual (+= x) and RMSNorm of one row, then the router on the normed row as the model dtype stores it (what a
    separate router Linear would read), in the same program: one launch for norm + router GEMV + expert choice."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < d
    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    # the weights (norm, router) first: under PDL their loads overlap the previous kernel's tail
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    wr = tl.load(rw_ptr + offs_e[:, None] * s_rw_e + offs[None, :] * s_rw_d, mask=mask_e[:, None] & mask[None, :],
                 other=0.0).to(tl.float32)
    # the bias here, not after the stores below: a load there could not be hoisted over them
    rb = load_or_zeros(rb_ptr, offs_e, mask_e, HAS_BIAS, BLOCK_E)
    pdl_wait(PDL)
    v = tl.load(res_ptr + row * s_r + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_X:
        v += tl.load(x_ptr + row * s_x + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(res_out_ptr + row * s_ro + offs, v, mask=mask)
    rstd = 1.0 / tl.sqrt(fsum(v * v, 0) / d + eps)
    normed = (v * rstd * w).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * s_o + offs, normed, mask=mask)

    logits = fsum(wr * normed.to(tl.float32)[None, :], 1) + rb
    rows = row + tl.arange(0, 1)
    _pick_experts(logits[None, :], mask_e, rows, rows >= 0, weights_ptr, experts_ptr, SOFTMAX, TOP_K)


@triton.jit
def moe_align_kernel(
    experts_ptr, sorted_ptr, block_expert_ptr,
    P, E, n_blocks,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_P: tl.constexpr,
):
    offs_e = tl.arange(0, BLOCK_E)
    offs_p = tl.arange(0, BLOCK_P)
    counts = tl.full((BLOCK_E,), 0, tl.int32)
    for start in range(0, P, BLOCK_P):
        p = start + offs_p
        e = tl.load(experts_ptr + p, mask=p < P, other=-1).to(tl.int32)
        counts += fsum((e[:, None] == offs_e[None, :]).to(tl.int32), 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pad_end = cumsum(padded, 0)
    pad_start = pad_end - padded

    for start in range(0, n_blocks * BLOCK_M, BLOCK_P):  # every slot starts as padding
        s = start + offs_p
        tl.store(sorted_ptr + s, tl.full((BLOCK_P,), 0, tl.int32) + P, mask=s < n_blocks * BLOCK_M)
    for start in range(0, n_blocks, BLOCK_P):  # expert of each block: how many segments end at or before its first row
        blk = start + offs_p
        owner = fsum((pad_end[None, :] <= (blk * BLOCK_M)[:, None]).to(tl.int32), 1)
        tl.store(block_expert_ptr + blk, owner, mask=blk < n_blocks)
    tl.debug_barrier()  # the padding above is written before the pair ids below land on top of it

    running = tl.full((BLOCK_E,), 0, tl.int32)
    for start in range(0, P, BLOCK_P):
        p = start + offs_p
        e = tl.load(experts_ptr + p, mask=p < P, other=-1).to(tl.int32)
        onehot = (e[:, None] == offs_e[None, :]).to(tl.int32)
        rank = fsum(onehot * cumsum(onehot, 0), 1) - 1  # position among this chunk's pairs of the same expert
        base = fsum(onehot * (pad_start + running)[None, :], 1)
        tl.store(sorted_ptr + base + rank, p, mask=p < P)
        running += fsum(onehot, 0)


def launch_config(shapes, dtypes=None, interpret: bool = False, *, from_hidden: bool = False) -> dict:
    """shapes: (logits (T, E),) or, with from_hidden, (x (T, d), router weight (E, d))."""
    T = shapes[0][0]
    E = shapes[1][0] if from_hidden else shapes[0][1]
    block_e = max(2, next_pow2(E))
    if from_hidden and not interpret:
        # one token per program: its (E, BLOCK_K) router tile stays small and all tokens run in parallel (a
        # (BLOCK_T, E, BLOCK_K) tile for many tokens made the K loop long and latency-bound: 26 us at 8 tokens)
        block_t = 1
    else:
        block_t = min(next_pow2(T), 64 if interpret else 16)
    block_k = min(next_pow2(shapes[0][1]), max(16, 4096 // (block_t * block_e))) if from_hidden else 16
    return {"kernel": "route_kernel", "grid": (triton.cdiv(T, block_t),), "num_warps": 4, "num_stages": 1,
            "constexprs": {"BLOCK_T": block_t, "BLOCK_E": block_e, "BLOCK_K": block_k}}


# The fused norm + router keeps an (E, d) router tile in registers: used while E * next_pow2(d) fits this many values.
NORM_ROUTE_MAX_TILE = 32768


def norm_route_launch_config(shapes, dtypes=None, interpret: bool = False) -> dict | None:
    """shapes: (x (T, d), router weight (E, d)). None when the router tile is too large to fuse."""
    (T, d), E = shapes[0], shapes[1][0]
    block, block_e = next_pow2(d), max(2, next_pow2(E))
    if block * block_e > NORM_ROUTE_MAX_TILE:
        return None
    return {"kernel": "add_rms_norm_route_kernel", "grid": (T,), "num_warps": max(1, min(8, block * block_e // 2048)),
            "num_stages": 1, "constexprs": {"BLOCK": block, "BLOCK_E": block_e}}


def align_launch_config(n_pairs: int, n_experts: int, block_m: int) -> dict:
    """The grouping for P = n_pairs pairs over E experts with BLOCK_M-row blocks; n_blocks is the static upper bound."""
    return {"kernel": "moe_align_kernel", "grid": (1,), "num_warps": 4, "num_stages": 1,
            "n_blocks": cdiv(n_pairs, block_m) + n_experts,
            "constexprs": {"BLOCK_M": block_m, "BLOCK_E": max(2, next_pow2(n_experts)),
                           "BLOCK_P": min(1024, max(16, next_pow2(n_pairs)))}}


def _route(src, w, b, router, top_k, from_hidden):
    if router not in ROUTERS:
        raise ValueError(f"unknown router {router!r} (supported: {', '.join(ROUTERS)})")
    if router == "sigmoid_top1" and top_k != 1:
        raise ValueError("the sigmoid router is top-1 only")
    T = src.shape[0]
    E = w.shape[0] if from_hidden else src.shape[1]
    weights = torch.empty(T, top_k, dtype=torch.float32, device=src.device)
    experts = torch.empty(T, top_k, dtype=torch.int64, device=src.device)
    if T == 0:
        return weights, experts
    kernel = kernel_for(route_kernel, src)
    cfg = launch_config((src.shape, w.shape) if from_hidden else (src.shape,), interpret=is_interpreted(kernel),
                        from_hidden=from_hidden)
    kernel[cfg["grid"]](
        src, w if w is not None else src, b if b is not None else src, weights, experts,
        T, E, src.shape[1], *src.stride(), *(w.stride() if w is not None else (0, 0)),
        FROM_HIDDEN=from_hidden, HAS_BIAS=b is not None, SOFTMAX=router == "softmax_topk", TOP_K=top_k,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **cfg["constexprs"],
    )
    return weights, experts


def route(logits, router, top_k):
    """Same contract as route_ref: logits (T, E) -> (weights (T, k) fp32, experts (T, k) int64)."""
    return _route(logits, None, None, router, top_k, from_hidden=False)


def route_hidden(x, weight, bias, router, top_k):
    """route_ref(x @ weight.T + bias, router, top_k) with the router GEMV fused (fp32 logits, never rounded to x.dtype).
    x: (T, d); weight: (E, d); bias: (E,) or None."""
    return _route(x, weight, bias, router, top_k, from_hidden=True)


def moe_align(experts: torch.Tensor, n_experts: int, block_m: int):
    """Group the (token, slot) pairs of `experts` (T, k) by expert. Returns (sorted_pairs (n_blocks * block_m,) int32,
    block_expert (n_blocks,) int32); see the module docstring."""
    P = experts.numel()
    cfg = align_launch_config(P, n_experts, block_m)
    n_blocks = cfg["n_blocks"]
    sorted_pairs = torch.empty(n_blocks * block_m, dtype=torch.int32, device=experts.device)
    block_expert = torch.empty(n_blocks, dtype=torch.int32, device=experts.device)
    flat = experts.reshape(-1)
    kernel = kernel_for(moe_align_kernel, flat)
    kernel[cfg["grid"]](flat, sorted_pairs, block_expert, P, n_experts, n_blocks,
                        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **cfg["constexprs"])
    return sorted_pairs, block_expert


def add_rms_norm_route(x, residual, weight, eps, router_weight, router_bias, router, top_k, *, residual_out=None):
    """add_rms_norm (x may be None: norm of the residual alone) and route_hidden of its output, in one launch.
    Returns (normed (T, d) in the model dtype, residual' fp32, weights (T, k) fp32, experts (T, k) int64), equal to
    add_rms_norm_ref then route_ref(normed @ router_weight.T + router_bias) with fp32 logits.
    Raises ValueError when the router tile is too large to fuse (see norm_route_launch_config)."""
    if router not in ROUTERS or (router == "sigmoid_top1" and top_k != 1):
        raise ValueError(f"router {router!r} with top_k={top_k} is not supported")
    ref = residual
    T, d = ref.shape
    cfg = norm_route_launch_config((ref.shape, router_weight.shape))
    if cfg is None:
        raise ValueError(f"add_rms_norm_route: router ({router_weight.shape[0]} x {d}) too large to fuse")
    dtype = x.dtype if x is not None else router_weight.dtype
    out = torch.empty(T, d, dtype=dtype, device=ref.device)
    if residual_out is None and x is not None:
        residual_out = torch.empty(T, d, dtype=torch.float32, device=ref.device)
    weights = torch.empty(T, top_k, dtype=torch.float32, device=ref.device)
    experts = torch.empty(T, top_k, dtype=torch.int64, device=ref.device)
    kernel = kernel_for(add_rms_norm_route_kernel, ref)
    kernel[cfg["grid"]](
        x if x is not None else ref, residual, weight, out, residual_out if x is not None else ref, router_weight,
        router_bias if router_bias is not None else router_weight, weights, experts,
        d, router_weight.shape[0], float(eps),
        x.stride(0) if x is not None else 0, residual.stride(0), out.stride(0),
        residual_out.stride(0) if x is not None else 0, *router_weight.stride(),
        HAS_X=x is not None, HAS_BIAS=router_bias is not None,
        SOFTMAX=router == "softmax_topk", TOP_K=top_k,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **cfg["constexprs"], **pdl_launch(ref),
    )
    return out, (residual_out if x is not None else residual), weights, experts
