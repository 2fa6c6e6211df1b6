"""The next norm (and router) as the tail of a decode projection: one launch fewer per use.

A decode projection (the out_proj GEMV, the expert fc2 GEMV) produces `pending`, the rows that the next kernel adds to
the residual stream and normalises (add_rms_norm; for an MoE block also routes: add_rms_norm_route). Here the
projection does it itself: every program that finishes a tile of y counts its arrival on a device counter, and the
last to arrive — when all of y is written — runs the norm (+ router) over the M rows: residual += y (in place, fp32),
normed = RMSNorm(residual) in the model dtype, then, with a router, fp32 logits and the expert choice. It reads y
from L2 (`.cg`: other programs wrote it) and resets the counter to 0, so the counter is zero between launches (no
memset; CUDA-graph safe). The maths is that of add_rms_norm_kernel / add_rms_norm_route_kernel, row by row.

`TAIL_SLOT` is the slot of gemv's per-device counter buffer these launches use; launches on one stream never
overlap, as for gemv's split-K counters.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import fsum, next_pow2
from .moe_routing import ROUTERS, _pick_experts

TAIL_NONE, TAIL_NORM, TAIL_NORM_ROUTE = 0, 1, 2


@triton.jit
def _norm_rows(y_ptr, s_y, res_ptr, s_r, nw_ptr, xo_ptr, s_xo, rw_ptr, s_rw_e, s_rw_d, rb_ptr, rwts_ptr, rexp_ptr,
               M, d, E, eps,
               ROUTE: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTMAX: tl.constexpr, TOP_K: tl.constexpr,
               BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < d
    w = tl.load(nw_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    if ROUTE:
        wr = tl.load(rw_ptr + offs_e[:, None] * s_rw_e + offs[None, :] * s_rw_d, mask=mask_e[:, None] & mask[None, :],
                     other=0.0).to(tl.float32)
    for m in range(M):
        v = tl.load(res_ptr + m * s_r + offs, mask=mask, other=0.0) + \
            tl.load(y_ptr + m * s_y + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
        tl.store(res_ptr + m * s_r + offs, v, mask=mask)
        rstd = 1.0 / tl.sqrt(fsum(v * v, 0) / d + eps)
        normed = (v * rstd * w).to(xo_ptr.dtype.element_ty)
        tl.store(xo_ptr + m * s_xo + offs, normed, mask=mask)
        if ROUTE:
            logits = fsum(wr * normed.to(tl.float32)[None, :], 1)
            if HAS_BIAS:
                logits += tl.load(rb_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
            rows = m + tl.arange(0, 1)
            _pick_experts(logits[None, :], mask_e, rows, rows >= 0, rwts_ptr, rexp_ptr, SOFTMAX, TOP_K)


@triton.jit
def row_tail(count_ptr, n_finishers, y_ptr, s_y, res_ptr, s_r, nw_ptr, xo_ptr, s_xo, rw_ptr, s_rw_e, s_rw_d, rb_ptr,
             rwts_ptr, rexp_ptr, M, d, E, eps,
             TAIL: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTMAX: tl.constexpr, TOP_K: tl.constexpr,
             BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    """Called by a program that has written its last tile of y: count its arrival; the last of n_finishers runs the
    norm (+ router) over all M rows and resets the counter."""
    tl.debug_barrier()  # every thread's stores of y are issued before the arrival is counted (release, gpu scope)
    arrived = tl.atomic_add(count_ptr, 1)
    if arrived == n_finishers - 1:
        _norm_rows(y_ptr, s_y, res_ptr, s_r, nw_ptr, xo_ptr, s_xo, rw_ptr, s_rw_e, s_rw_d, rb_ptr, rwts_ptr, rexp_ptr,
                   M, d, E, eps, TAIL == 2, HAS_BIAS, SOFTMAX, TOP_K, BLOCK, BLOCK_E)
        tl.store(count_ptr, 0)


def tail_arguments(tail, y: torch.Tensor, counters: torch.Tensor, slot: int) -> tuple[dict, tuple]:
    """tail = {"residual": (M, d) fp32 contiguous (updated in place), "weight": norm weight (d,), "eps": float,
    optional "router": (weight (E, d), bias (E,) or None, kind, top_k)} for the projection output y (M, d).
    Returns (the kernel's tail arguments, (normed (M, d) in y.dtype, route weights (M, k) fp32 | None,
    experts (M, k) int64 | None))."""
    M, d = y.shape
    res = tail["residual"]
    if res.shape != (M, d) or res.dtype != torch.float32 or not res.is_contiguous():
        raise ValueError(f"row tail: residual {res.dtype} {tuple(res.shape)} must be contiguous fp32 ({M}, {d})")
    normed = torch.empty(M, d, dtype=y.dtype, device=y.device)
    router = tail.get("router")
    route_w = route_e = None
    args = {"tail_count_ptr": counters[slot:], "res_ptr": res, "nw_ptr": tail["weight"], "xo_ptr": normed,
            "eps": float(tail["eps"]), "s_r": res.stride(0), "s_xo": normed.stride(0),
            "TAIL": TAIL_NORM, "TAIL_BLOCK": next_pow2(d)}
    if router is not None:
        rw, rb, kind, top_k = router
        if kind not in ROUTERS or (kind == "sigmoid_top1" and top_k != 1) or rw.shape[1] != d:
            raise ValueError(f"row tail: router {kind!r} top_k={top_k} weight {tuple(rw.shape)} for d={d}")
        route_w = torch.empty(M, top_k, dtype=torch.float32, device=y.device)
        route_e = torch.empty(M, top_k, dtype=torch.int64, device=y.device)
        args.update({"rw_ptr": rw, "s_rw_e": rw.stride(0), "s_rw_d": rw.stride(1),
                     "rb_ptr": rb if rb is not None else rw, "rwts_ptr": route_w, "rexp_ptr": route_e,
                     "E": rw.shape[0], "TAIL": TAIL_NORM_ROUTE, "TAIL_BIAS": rb is not None,
                     "TAIL_SOFTMAX": kind == "softmax_topk", "TAIL_TOP_K": top_k,
                     "TAIL_BLOCK_E": max(2, next_pow2(rw.shape[0]))})
    return args, (normed, route_w, route_e)
