"""The whole batch-1 decode step of a Mamba + MoE model (BlackMamba, MoE-Mamba) in ONE persistent launch.

Why: at batch 1 a decode step is a chain of weight streams (in_proj, out_proj, experts) and short dependent kernels
(x_proj, state update, norms, router). As separate launches each stream ramps up and drains, and each short kernel
costs a dependent hop (H100, benchmarks/README.md: ~300 us of the 2.8B's 0.76 ms step above its bytes at the copy
rate). Here a fixed set of programs (PER_SM per SM, all resident) runs every block's phases in order, separated by
grid-wide barriers, and each program loads its first weight tile of a phase BEFORE waiting at that phase's barrier
(weights are constants), so that the hops need no launches. Measured on the H100 it is NOT faster than the per-kernel
step (2.8B batch 1: 0.843 ms against 0.751 ms; benchmarks/README.md): a grid barrier costs about what a PDL hop
costs (1-2.5 us with the slowest program's lag), and a few programs an SM stream a phase's rows no faster than many
short-lived ones. torch-fast therefore runs it only when asked (TorchFastRunner(persistent=True)).

Per block, the phases (a barrier before each, none before the very first):
  Mamba: A  residual (+ previous block's output) and RMSNorm, recomputed by every program (program 0 stores the
            residual), then in_proj rows with the conv update (+ SiLU) fused on the x half, the conv window read with
            the weight tile; B  x_proj rows; C  the selective state update (dt_proj, softplus, D, gate) on the program's
            channels; D  out_proj rows -> the block's output.
  MoE:   E  residual + RMSNorm + router (top-1: sigmoid or softmax), recomputed by every program, then fc1 rows
            (gate and up, activation); F  fc2 rows of the chosen expert times the route weight -> the block's output.
The numerics are those of the separate kernels (the same fp32 accumulations, rounded to the model dtype at the same
points), checked against the reference model in tests/runtime/test_torch_fast_persistent.py.

Grid barrier: an arrival counter (sync[0]) over the whole launch: each program adds 1 (acq_rel) and polls (acquire)
until barrier k's (k + 1) * programs arrivals; the last program to leave the kernel resets it (and the exit count,
sync[1]), so no memset launch is needed between steps. The barrier is only
correct when every program is resident at once: the launcher compiles the kernel first and refuses a launch whose
PER_SM programs do not fit on one SM together (registers, shared memory, threads). A bounded spin sets sync[2] instead of hanging forever
(the launcher's `check` reports it). In Triton's CPU interpreter programs run one after another, so it runs with a
single program (every phase's rows looped by that program): the maths is tested on CPU, the partition on the GPU.

Block table: int64 (n_blocks, N_COLS), one row per block: its kind and the addresses of its tensors (columns below),
so one launch reaches every layer's separate parameter tensors without copying them. All rows contiguous.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .common import (
    ACTIVATION_CODES,
    LOG2E,
    activate,
    argmax,
    cdiv,
    fmax,
    fsum,
    load_or_zeros,
    next_pow2,
    pdl_launch,
    sigmoid,
    softplus,
)
from .interpret import is_interpreted, kernel_for

# block-table columns (constexpr: read inside the kernel)
COLUMNS = ("kind", "norm_w", "in_w", "in_b", "conv_state", "conv_w", "conv_b", "xproj_w", "dtproj_w", "dt_bias", "A",
           "D", "ssm_state", "out_w", "out_b", "router_w", "router_b", "w1", "w2")
KIND, NORM_W, IN_W, IN_B, CONV_STATE, CONV_W, CONV_B, XPROJ_W, DTPROJ_W, DT_BIAS, A_MAT, D_SKIP, SSM_STATE, OUT_W, \
    OUT_B, ROUTER_W, ROUTER_B, W1, W2 = (tl.constexpr(i) for i in range(len(COLUMNS)))
N_COLS = tl.constexpr(20)  # (one spare column: rows of 160 bytes)
MAMBA, MOE = 0, 1
# Launch shape, measured on the H100 (2.8B batch 1, captured step; benchmarks/trace_persistent.py,
# results/trace_persistent_*.json): 2 programs of 4 warps an SM with the tile rows below 0.870-0.874 ms (0.843 ms
# once in_proj's conv rows were shared evenly); 1 program of
# 8 warps (twice the rows a tile) 1.08 ms: one program an SM serialises load, reduction and epilogue of each tile, a
# second program overlaps them (in_proj 15.5 -> 8.0 us a layer). 2 warps x 3-4 programs spill (ptxas: 208 spills).
PER_SM = 2  # programs an SM
SPIN_LIMIT = tl.constexpr(1 << 24)  # barrier polls before giving up (seconds on a GPU): a flag instead of a hang
WARPS = 4
# rows of one weight tile per phase, (in_proj, x_proj, out_proj, fc1 (gate and up each), fc2): full-K tiles of
# BN x next_pow2(K) elements, two in flight a program (the one computed and the next). Twice these at 4 warps spill.
TILE_ROWS = {"in": 4, "x": 1, "out": 2, "fc1": 2, "fc2": 2}
# Per-program L2 prefetch of each phase's rows (Hopper's bulk prefetch, _prefetch_rows): off. Measured on the H100
# with the launch above: 0.970 ms on against 0.874 ms off (fc1 and fc2 slower: the prefetches compete with the tile
# loads); with one 8-warp program an SM 1.128 against 1.080 ms. MAMBADEPLOY_PERSISTENT_PREFETCH=1 turns it on.
PREFETCH_DEFAULT = False


@triton.jit
def _ptr(row, col: tl.constexpr, ty: tl.constexpr):
    """The address in column col of a block-table row, as a pointer to ty. 16-byte aligned (block_table checks): without
    the hint the compiler cannot vectorise loads through an address it read from memory (scalar 2-byte loads)."""
    return tl.multiple_of(tl.load(row + col).to(tl.pointer_type(ty)), 16)


_GLOBALTIMER = tl.constexpr("mov.u64 $0, %globaltimer;")


@triton.jit
def _stamp(trace_ptr, slot, pid, TRACE: tl.constexpr):
    """TRACE: program 0 records the GPU's global timer (ns) in trace[slot] (how long phases and barriers take)."""
    if TRACE:  # noqa: SIM102 (a compile-time branch around a run-time one)
        if pid == 0:
            t = tl.inline_asm_elementwise(_GLOBALTIMER, "=l", [], dtype=tl.int64, is_pure=False, pack=1)
            tl.store(trace_ptr + slot, t)


@triton.jit
def _grid_sync(sync_ptr, passed, nprog, trace_ptr, pid, TRACE: tl.constexpr):
    """Grid-wide barrier number `passed` (0-based, counted by every program alike) -> passed + 1. Every store this
    program made before it is visible to every program after it (bar.sync, then release / acquire at gpu scope).
    sync[0] counts arrivals over the whole launch (barrier k opens at (k + 1) * nprog); it is reset by the last
    program to leave the kernel (_leave), when nobody polls it any more."""
    _stamp(trace_ptr, 1 + 2 * passed, pid, TRACE)
    tl.debug_barrier()
    target = (passed + 1) * nprog
    seen = tl.atomic_add(sync_ptr, 1, sem="acq_rel", scope="gpu") + 1
    spins = 0
    while (seen < target) & (spins < SPIN_LIMIT):
        seen = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
        spins += 1
    if spins >= SPIN_LIMIT:
        tl.atomic_xchg(sync_ptr + 2, 1, sem="relaxed", scope="gpu")
    tl.debug_barrier()
    _stamp(trace_ptr, 2 + 2 * passed, pid, TRACE)
    return passed + 1


@triton.jit
def _leave(sync_ptr, nprog):
    """The last program out resets the arrival and exit counters for the next launch."""
    tl.debug_barrier()
    left = tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel", scope="gpu")
    if left == nprog - 1:
        tl.atomic_xchg(sync_ptr, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(sync_ptr + 1, 0, sem="relaxed", scope="gpu")


_PREFETCH_ASM = tl.constexpr("""{
.reg .pred pf_p;
setp.gt.s32 pf_p, $2, 0;
@pf_p cp.async.bulk.prefetch.L2.global [$1], $2;
mov.u32 $0, 0;
}""")


@triton.jit
def _prefetch_rows(w_ptr, lo, hi, K, NP: tl.constexpr, ON: tl.constexpr):
    """ON (sm_90+, never in the interpreter): ask the copy engine to bring rows [lo, hi) of a row-major (N, K) weight
    into L2, in NP pieces (one a thread). A hint: it changes no result. The program's own rows of a phase are in
    flight at once, however few registers it has for tiles; its tile loads then hit L2 or join these requests.
    (K * element size must be a multiple of 16 bytes: the launcher checks.)"""
    if ON:
        elt = w_ptr.dtype.element_ty.primitive_bitwidth // 8
        nbytes = (hi - lo).to(tl.int64) * K * elt
        piece = ((nbytes + NP - 1) // NP + 15) // 16 * 16
        off = tl.arange(0, NP).to(tl.int64) * piece
        size = tl.maximum(tl.minimum(piece, nbytes - off), 0).to(tl.int32)
        start = (w_ptr + lo.to(tl.int64) * K).to(tl.pointer_type(tl.int8))
        tl.inline_asm_elementwise(_PREFETCH_ASM, "=r,l,r", [start + off, size], dtype=tl.int32, is_pure=False,
                                  pack=1)


@triton.jit
def _conv_window(cs, cw, rows, hi, DI, offs_kc, KC: tl.constexpr):
    """The conv state of rows (< DI) shifted by one (its columns 1.. at 0..; the last column is left for this step's
    input) and the taps, fp32 (BN, KC_BLOCK). Only this program reads or writes these rows' state."""
    conv = (rows < hi) & (rows < DI)
    cmask = conv[:, None] & (offs_kc < KC)[None, :]
    crow = rows.to(tl.int64)[:, None] * KC
    win = tl.load(cs + crow + offs_kc[None, :] + 1, mask=cmask & (offs_kc < KC - 1)[None, :], other=0.0)
    taps = tl.load(cw + crow + offs_kc[None, :], mask=cmask, other=0.0).to(tl.float32)
    return win, taps


@triton.jit
def _rows(w_ptr, rows, row_hi, offs_k, K):
    """A full-K weight tile: rows (BN,) of a row-major (N, K) matrix, zeros past row_hi / K (no memory read there)."""
    return tl.load(w_ptr + rows.to(tl.int64)[:, None] * K + offs_k[None, :],
                   mask=(rows < row_hi)[:, None] & (offs_k < K)[None, :], other=0.0)


@triton.jit
def _gemv_rows(w_ptr, w_cur, v, lo, hi, K, offs_k, out_ptr, scale, b_ptr, HAS_BIAS: tl.constexpr, BN: tl.constexpr,
               ty: tl.constexpr):
    """Rows [lo, hi) of a row-major (N, K) weight times v (fp32, offs_k wide) -> out[rows] = ((W v + bias) * scale) in
    ty. w_cur: the first tile, loaded by the caller (before the phase's barrier); the next tile is always in flight."""
    for r0 in range(lo, hi, BN):
        rows = r0 + tl.arange(0, BN)
        w_next = _rows(w_ptr, rows + BN, hi, offs_k, K)
        out = fsum(w_cur.to(tl.float32) * v[None, :], 1)
        if HAS_BIAS:
            out += tl.load(b_ptr + rows, mask=rows < hi, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, (out * scale).to(ty), mask=rows < hi)
        w_cur = w_next


@triton.jit
def _share(n, pid, nprog):
    """This program's contiguous share [lo, hi) of n rows."""
    per = (n + nprog - 1) // nprog
    lo = pid * per
    return lo, tl.minimum(lo + per, n)


@triton.jit
def _residual_norm(b, tok, emb_ptr, res_ptr, pend_ptr, norm_w, offs, mask, d, eps, pid, ty: tl.constexpr):
    """Block b's input: residual (block 0: the token's embedding row; else residual + the previous block's output),
    stored by program 0 into the other residual buffer, and its RMSNorm rounded to ty (every program computes it)."""
    if b == 0:
        v = tl.load(emb_ptr + tok * d + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        v = tl.load(res_ptr + (b % 2) * d + offs, mask=mask, other=0.0, cache_modifier=".cg") + \
            tl.load(pend_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
    if pid == 0:
        tl.store(res_ptr + ((b + 1) % 2) * d + offs, v, mask=mask)
    rstd = 1.0 / tl.sqrt(fsum(v * v, 0) / d + eps)
    return (v * rstd * norm_w).to(ty)


@triton.jit
def persistent_decode_kernel(
    table_ptr, tok_ptr, emb_ptr, res_ptr, pend_ptr, xz_ptr, xdbl_ptr, y_ptr, h_ptr, sync_ptr,
    n_blocks, d, DI, R, NS, E, FF, eps,
    KC: tl.constexpr, D_BLOCK: tl.constexpr, DI_BLOCK: tl.constexpr, FF_BLOCK: tl.constexpr, R_BLOCK: tl.constexpr,
    NS_BLOCK: tl.constexpr, E_BLOCK: tl.constexpr, KC_BLOCK: tl.constexpr, BC: tl.constexpr,
    BN_IN: tl.constexpr, BN_X: tl.constexpr, BN_OUT: tl.constexpr, BN_F1: tl.constexpr, BN_F2: tl.constexpr,
    HAS_IN_BIAS: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, HAS_OUT_BIAS: tl.constexpr,
    HAS_ROUTER_BIAS: tl.constexpr, SOFTMAX: tl.constexpr, ACTIVATION: tl.constexpr, PDL: tl.constexpr = False,
    PREFETCH: tl.constexpr = False, NP: tl.constexpr = 256, trace_ptr=None, TRACE: tl.constexpr = False,
    TRACE_BASE=0,
):
    ty = pend_ptr.dtype.element_ty  # the model dtype
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if PDL:  # the step's first kernel: wait for whatever ran before it on the stream
        tl.extra.cuda.gdc_wait()
    tok = tl.load(tok_ptr).to(tl.int64)
    _stamp(trace_ptr, 0, pid, TRACE)  # (TRACE: slot 0 the start, then an entry / exit pair a barrier, then the end)
    offs_d = tl.arange(0, D_BLOCK)
    mask_d = offs_d < d
    offs_di = tl.arange(0, DI_BLOCK)
    offs_ff = tl.arange(0, FF_BLOCK)
    offs_kc = tl.arange(0, KC_BLOCK)
    passed = pid * 0  # barriers passed so far (an int32 every program counts alike)
    for b in range(n_blocks):
        row = table_ptr + b * N_COLS
        kind = tl.load(row + KIND)
        norm_w = tl.load(_ptr(row, NORM_W, ty) + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        if kind == 0:
            # ---- A: norm, in_proj (+ conv on the x half) -------------------------------------------------------
            in_w = _ptr(row, IN_W, ty)
            cs = _ptr(row, CONV_STATE, tl.float32)
            cw = _ptr(row, CONV_W, ty)
            # each program takes the same share of the x half (with the conv) and of the z half, so that the conv
            # work is spread evenly (a contiguous share of all 2 * DI rows left half the programs with all of it)
            lo, hi = _share(DI, pid, nprog)
            _prefetch_rows(in_w, lo, hi, d, NP, PREFETCH)
            _prefetch_rows(in_w, DI + lo, DI + hi, d, NP, PREFETCH)
            rows = lo + tl.arange(0, BN_IN)
            w_cur = _rows(in_w, rows, hi, offs_d, d)
            win_cur, taps_cur = _conv_window(cs, cw, rows, hi, DI, offs_kc, KC)
            z_cur = _rows(in_w, DI + rows, DI + hi, offs_d, d)
            if b > 0:
                passed = _grid_sync(sync_ptr, passed, nprog, trace_ptr, pid, TRACE)
            x = _residual_norm(b, tok, emb_ptr, res_ptr, pend_ptr, norm_w, offs_d, mask_d, d, eps, pid, ty)
            xf = x.to(tl.float32)
            _stamp(trace_ptr, TRACE_BASE + 2 * b, pid, TRACE)
            for r0 in range(lo, hi, BN_IN):  # x half: projection, then the conv update + SiLU
                rows = r0 + tl.arange(0, BN_IN)
                conv = rows < hi
                cmask = conv[:, None] & (offs_kc < KC)[None, :]
                crow = rows.to(tl.int64)[:, None] * KC
                # the next tile's weights and conv window are loaded before this tile is computed (two in flight)
                w_next = _rows(in_w, rows + BN_IN, hi, offs_d, d)
                win_next, taps_next = _conv_window(cs, cw, rows + BN_IN, hi, DI, offs_kc, KC)
                out = fsum(w_cur.to(tl.float32) * xf[None, :], 1)
                if HAS_IN_BIAS:
                    out += tl.load(_ptr(row, IN_B, ty) + rows, mask=conv, other=0.0).to(tl.float32)
                new = out.to(ty).to(tl.float32)  # the conv reads the projection as the model dtype stores it
                win = tl.where((offs_kc == KC - 1)[None, :], new[:, None], win_cur)
                acc = fsum(win * taps_cur, 1)
                if HAS_CONV_BIAS:
                    acc += tl.load(_ptr(row, CONV_B, ty) + rows, mask=conv, other=0.0).to(tl.float32)
                tl.store(cs + crow + offs_kc[None, :], win, mask=cmask)
                tl.store(xz_ptr + rows, (acc * sigmoid(acc)).to(ty), mask=conv)
                w_cur = w_next
                win_cur = win_next
                taps_cur = taps_next
            _gemv_rows(in_w, z_cur, xf, DI + lo, DI + hi, d, offs_d, xz_ptr, 1.0, _ptr(row, IN_B, ty), HAS_IN_BIAS,
                       BN_IN, ty)  # z half: the projection alone
            _stamp(trace_ptr, TRACE_BASE + 2 * b + 1, pid, TRACE)
            # ---- B: x_proj -----------------------------------------------------------------------------------
            xp_w = _ptr(row, XPROJ_W, ty)
            XD = R + 2 * NS
            lo, hi = _share(XD, pid, nprog)
            rows = lo + tl.arange(0, BN_X)
            w_cur = _rows(xp_w, rows, hi, offs_di, DI)
            o_w = _ptr(row, OUT_W, ty)
            o_lo, o_hi = _share(d, pid, nprog)
            _prefetch_rows(o_w, o_lo, o_hi, DI, NP, PREFETCH)  # out_proj's rows stream in during B, C and barriers
            passed = _grid_sync(sync_ptr, passed, nprog, trace_ptr, pid, TRACE)
            xc = tl.load(xz_ptr + offs_di, mask=offs_di < DI, other=0.0, cache_modifier=".cg").to(tl.float32)
            _gemv_rows(xp_w, w_cur, xc, lo, hi, DI, offs_di, xdbl_ptr, 1.0, xdbl_ptr, False, BN_X, ty)
            # ---- C: state update on this program's channels ---------------------------------------------------
            c_lo, c_hi = _share(DI, pid, nprog)
            ch = c_lo + tl.arange(0, BC)
            mc = ch < c_hi
            offs_n = tl.arange(0, NS_BLOCK)
            mn = offs_n < NS
            offs_r = tl.arange(0, R_BLOCK)
            mr = offs_r < R
            m_cn = mc[:, None] & mn[None, :]
            A = tl.load(_ptr(row, A_MAT, tl.float32) + ch[:, None] * NS + offs_n[None, :], mask=m_cn, other=0.0)
            dtw = tl.load(_ptr(row, DTPROJ_W, ty) + ch[:, None] * R + offs_r[None, :], mask=mc[:, None] & mr[None, :],
                          other=0.0).to(tl.float32)
            dtb = tl.load(_ptr(row, DT_BIAS, tl.float32) + ch, mask=mc, other=0.0)
            Dv = tl.load(_ptr(row, D_SKIP, tl.float32) + ch, mask=mc, other=0.0)
            st_at = _ptr(row, SSM_STATE, tl.float32) + ch[:, None] * NS + offs_n[None, :]
            h = tl.load(st_at, mask=m_cn, other=0.0)  # this program's own channels: no other program touches them
            passed = _grid_sync(sync_ptr, passed, nprog, trace_ptr, pid, TRACE)
            low = tl.load(xdbl_ptr + offs_r, mask=mr, other=0.0, cache_modifier=".cg").to(tl.float32)
            Bv = tl.load(xdbl_ptr + R + offs_n, mask=mn, other=0.0, cache_modifier=".cg").to(tl.float32)
            Cv = tl.load(xdbl_ptr + R + NS + offs_n, mask=mn, other=0.0, cache_modifier=".cg").to(tl.float32)
            xv = tl.load(xz_ptr + ch, mask=mc, other=0.0, cache_modifier=".cg").to(tl.float32)
            zv = tl.load(xz_ptr + DI + ch, mask=mc, other=0.0, cache_modifier=".cg").to(tl.float32)
            dt = softplus(fsum(dtw * low[None, :], 1) + dtb)
            h = tl.exp2(dt[:, None] * A * LOG2E) * h + (dt * xv)[:, None] * Bv[None, :]
            tl.store(st_at, h, mask=m_cn)
            yv = (fsum(h * Cv[None, :], 1) + xv * Dv) * (zv * sigmoid(zv))
            tl.store(y_ptr + ch, yv.to(ty), mask=mc)
            # ---- D: out_proj -> the block's output ------------------------------------------------------------
            lo, hi = _share(d, pid, nprog)
            rows = lo + tl.arange(0, BN_OUT)
            w_cur = _rows(o_w, rows, hi, offs_di, DI)
            passed = _grid_sync(sync_ptr, passed, nprog, trace_ptr, pid, TRACE)
            yf = tl.load(y_ptr + offs_di, mask=offs_di < DI, other=0.0, cache_modifier=".cg").to(tl.float32)
            _gemv_rows(o_w, w_cur, yf, lo, hi, DI, offs_di, pend_ptr, 1.0, _ptr(row, OUT_B, ty), HAS_OUT_BIAS, BN_OUT,
                       ty)
        else:
            # ---- E: norm, router, fc1 ----------------------------------------------------------------------------
            offs_e = tl.arange(0, E_BLOCK)
            me = offs_e < E
            wr = tl.load(_ptr(row, ROUTER_W, ty) + offs_e[:, None] * d + offs_d[None, :],
                         mask=me[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            rb = load_or_zeros(_ptr(row, ROUTER_B, ty), offs_e, me, HAS_ROUTER_BIAS, E_BLOCK)
            if b > 0:
                passed = _grid_sync(sync_ptr, passed, nprog, trace_ptr, pid, TRACE)
            x = _residual_norm(b, tok, emb_ptr, res_ptr, pend_ptr, norm_w, offs_d, mask_d, d, eps, pid, ty)
            xf = x.to(tl.float32)
            logits = tl.where(me, fsum(wr * xf[None, :], 1) + rb, float("-inf"))
            index = offs_e
            if SOFTMAX:
                p = tl.exp(logits - fmax(logits, 0))
                p = p / fsum(p, 0)
                wgt, e = argmax(p, index, 0)
            else:
                top, e = argmax(logits, index, 0)
                wgt = sigmoid(top)
            e64 = e.to(tl.int64)
            w1 = _ptr(row, W1, ty) + e64 * (2 * FF) * d
            w2 = _ptr(row, W2, ty) + e64 * d * FF
            lo, hi = _share(FF, pid, nprog)
            _prefetch_rows(w1, lo, hi, d, NP, PREFETCH)
            _prefetch_rows(w1 + FF * d, lo, hi, d, NP, PREFETCH)
            f_lo, f_hi = _share(d, pid, nprog)
            _prefetch_rows(w2, f_lo, f_hi, FF, NP, PREFETCH)
            _stamp(trace_ptr, TRACE_BASE + 2 * b, pid, TRACE)
            rows = lo + tl.arange(0, BN_F1)
            g_cur = _rows(w1, rows, hi, offs_d, d)
            u_cur = _rows(w1 + FF * d, rows, hi, offs_d, d)
            for r0 in range(lo, hi, BN_F1):
                rows = r0 + tl.arange(0, BN_F1)
                g_next = _rows(w1, rows + BN_F1, hi, offs_d, d)
                u_next = _rows(w1 + FF * d, rows + BN_F1, hi, offs_d, d)
                hv = activate(fsum(g_cur.to(tl.float32) * xf[None, :], 1), ACTIVATION) * \
                    fsum(u_cur.to(tl.float32) * xf[None, :], 1)
                tl.store(h_ptr + rows, hv.to(ty), mask=rows < hi)
                g_cur = g_next
                u_cur = u_next
            _stamp(trace_ptr, TRACE_BASE + 2 * b + 1, pid, TRACE)
            # ---- F: fc2 of the chosen expert, times the route weight -> the block's output ----------------------
            lo, hi = _share(d, pid, nprog)
            rows = lo + tl.arange(0, BN_F2)
            w_cur = _rows(w2, rows, hi, offs_ff, FF)
            passed = _grid_sync(sync_ptr, passed, nprog, trace_ptr, pid, TRACE)
            hf = tl.load(h_ptr + offs_ff, mask=offs_ff < FF, other=0.0, cache_modifier=".cg").to(tl.float32)
            _gemv_rows(w2, w_cur, hf, lo, hi, FF, offs_ff, pend_ptr, wgt, pend_ptr, False, BN_F2, ty)
    _stamp(trace_ptr, 1 + 2 * passed, pid, TRACE)
    _leave(sync_ptr, nprog)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


# --------------------------------------------------------------------------- host side
class PersistentTimeout(RuntimeError):
    """A grid barrier gave up waiting (programs were not all resident): the step's results are not valid."""


FP32_COLUMNS = ("conv_state", "dt_bias", "A", "D", "ssm_state")  # the rest are in the model dtype


def block_table(blocks: list[dict], device, dtype: torch.dtype) -> torch.Tensor:
    """blocks: one dict a block, {"kind": MAMBA | MOE, column name: tensor or None} (columns in COLUMNS; absent or
    None: 0). Every tensor must be contiguous (the kernel indexes rows of K elements) on `device`, fp32 in
    FP32_COLUMNS and `dtype` (the model's) elsewhere; the caller keeps them alive for as long as the table is used.
    -> int64 (n_blocks, N_COLS) on device."""
    table = torch.zeros(len(blocks), N_COLS.value, dtype=torch.int64)
    for i, block in enumerate(blocks):
        table[i, 0] = int(block["kind"])
        for j, name in enumerate(COLUMNS[1:], start=1):
            t = block.get(name)
            if t is None:
                continue
            want = torch.float32 if name in FP32_COLUMNS else dtype
            if not t.is_contiguous() or t.dtype != want or t.device != torch.device(device) or t.data_ptr() % 16:
                raise ValueError(f"persistent decode: block {i} {name} {t.dtype} {tuple(t.shape)} on {t.device} must "
                                 f"be contiguous {want} on {device}, 16-byte aligned")
            table[i, j] = t.data_ptr()
    return table.to(device)


def launch_config(spec: dict, sms: int, interpret: bool = False, prefetch_ok: bool = True) -> dict:
    """spec: the model's sizes (d, d_inner, dt_rank, d_state, n_experts, ffn, d_conv). sms: the GPU's SM count;
    PER_SM programs of WARPS warps run on each (MAMBADEPLOY_PERSISTENT_PER_SM / _WARPS override them for sweeps; the
    launcher checks that they fit). The interpreter runs one program (it runs programs one after another, so a second
    would wait forever at the first barrier)."""
    per_sm = int(os.environ.get("MAMBADEPLOY_PERSISTENT_PER_SM", PER_SM))
    warps = 4 if interpret else int(os.environ.get("MAMBADEPLOY_PERSISTENT_WARPS", WARPS))
    P = 1 if interpret else int(sms) * per_sm
    rows = dict(TILE_ROWS)
    for item in filter(None, os.environ.get("MAMBADEPLOY_PERSISTENT_TILES", "").split(",")):  # a sweep knob
        key, _, value = item.partition("=")
        if key.strip() not in rows:
            raise ValueError(f"MAMBADEPLOY_PERSISTENT_TILES: unknown phase {key!r} (known: {', '.join(rows)})")
        rows[key.strip()] = int(value)
    # per-program L2 prefetch of each phase's rows: Hopper's bulk prefetch, rows of whole 16-byte pieces
    prefetch = (not interpret and prefetch_ok and all(spec[k] % 8 == 0 for k in ("d", "d_inner", "ffn"))
                and os.environ.get("MAMBADEPLOY_PERSISTENT_PREFETCH", "1" if PREFETCH_DEFAULT else "0") != "0")
    return {"kernel": "persistent_decode_kernel", "grid": (P,), "num_warps": warps, "num_stages": 1,
            "per_sm": 1 if interpret else per_sm,
            "constexprs": {"KC": spec["d_conv"], "D_BLOCK": next_pow2(spec["d"]),
                           "DI_BLOCK": next_pow2(spec["d_inner"]), "FF_BLOCK": next_pow2(spec["ffn"]),
                           "R_BLOCK": next_pow2(spec["dt_rank"]), "NS_BLOCK": next_pow2(spec["d_state"]),
                           "E_BLOCK": next_pow2(spec["n_experts"]), "KC_BLOCK": next_pow2(spec["d_conv"]),
                           "BC": next_pow2(cdiv(spec["d_inner"], P)),
                           "BN_IN": rows["in"], "BN_X": rows["x"], "BN_OUT": rows["out"], "BN_F1": rows["fc1"],
                           "BN_F2": rows["fc2"], "PREFETCH": prefetch, "NP": 32 * warps}}


class PersistentDecode:
    """The buffers and launch of one persistent batch-1 step over a fixed block table (one per decode state: the
    table holds that state's conv / SSM tensors). spec: sizes (see launch_config) and the model's options: eps,
    in_bias, conv_bias, out_bias, router_bias (bools), router ("sigmoid_top1" | "softmax_topk", top-1 only),
    activation (a key of ACTIVATION_CODES)."""

    def __init__(self, spec: dict, table: torch.Tensor, embedding: torch.Tensor, sms: int | None = None,
                 trace: bool = False):
        if spec["router"] not in ("sigmoid_top1", "softmax_topk") or spec.get("top_k", 1) != 1:
            raise ValueError(f"persistent decode: router {spec['router']} top-{spec.get('top_k', 1)} (top-1 only)")
        if spec["activation"] not in ACTIVATION_CODES:
            raise ValueError(f"persistent decode: unknown activation {spec['activation']!r}")
        self.spec, self.table, self.embedding = spec, table, embedding
        dev, dt = embedding.device, embedding.dtype
        self.kernel = kernel_for(persistent_decode_kernel, embedding)
        if sms is None:
            sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1
        interpret = is_interpreted(self.kernel)
        hopper = dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] >= 9
        self.config = launch_config(spec, sms, interpret=interpret, prefetch_ok=hopper and
                                    os.environ.get("MAMBADEPLOY_L2_PREFETCH", "1") != "0")
        d, di = spec["d"], spec["d_inner"]
        self.residual = torch.zeros(2, d, dtype=torch.float32, device=dev)  # ping-pong
        self.pending = torch.zeros(d, dtype=dt, device=dev)  # each block's output
        self.xz = torch.zeros(2 * di, dtype=dt, device=dev)
        self.xdbl = torch.zeros(spec["dt_rank"] + 2 * spec["d_state"], dtype=dt, device=dev)
        self.y = torch.zeros(di, dtype=dt, device=dev)
        self.h = torch.zeros(spec["ffn"], dtype=dt, device=dev)
        self.sync = torch.zeros(4, dtype=torch.int32, device=dev)  # arrivals, exits, timeout flag, spare
        self.kinds = kinds = table[:, 0].tolist()  # (read once: the table lives on the device)
        # the phase after each barrier (none before the first block's first phase), in launch order
        self.phases = [name for k in kinds for name in (("in_proj", "x_proj", "state_update", "out_proj")
                                                          if k == MAMBA else ("norm_route_fc1", "fc2"))]
        # trace: an entry / exit pair a barrier (+ start, end), then two stamps a block (A: after the norm, after
        # in_proj; E: after routing, after fc1)
        self.trace_base = 2 * len(self.phases) + 2
        self.trace = torch.zeros(self.trace_base + 2 * len(kinds), dtype=torch.int64, device=dev) if trace else None
        self.compiled = None
        self._resident = False  # checked at the first GPU call

    def __call__(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (1,) int64 -> (the last block's output (1, d), the residual before it (1, d) fp32): what the
        model's final norm takes. Both are this object's buffers (overwritten by the next call)."""
        if tokens.is_cuda and not self._resident:  # compiled (not run) first: every program must fit at once
            self._check_resident(self._launch(tokens, warmup=True))
            self._resident = True
        self.compiled = self._launch(tokens)
        return self.pending.view(1, -1), self.residual[self.table.shape[0] % 2].view(1, -1)

    def _check_resident(self, compiled):
        """Raise unless PER_SM programs fit on one SM together (registers, shared memory, threads): a grid barrier
        over programs that are not all resident would never open."""
        cfg = self.config
        if hasattr(compiled, "_init_handles"):
            compiled._init_handles()  # (fills n_regs)
        props = torch.cuda.get_device_properties(self.embedding.device)
        threads = 32 * cfg["num_warps"]
        per_sm, regs, smem = cfg["per_sm"], compiled.n_regs * threads, compiled.metadata.shared
        fits = (regs <= 65536 and regs * per_sm <= getattr(props, "regs_per_multiprocessor", 65536)
                and smem * per_sm <= getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
                and threads * per_sm <= getattr(props, "max_threads_per_multi_processor", 2048))
        if not fits:
            raise ValueError(f"persistent decode: {per_sm} program(s) of {cfg['num_warps']} warps ({compiled.n_regs} "
                             f"registers a thread, {smem} bytes of shared memory) do not fit on one SM together; the "
                             f"grid barrier needs every program resident")

    def _launch(self, tokens, warmup=False):
        """Launch (or with warmup only compile) the kernel; returns the compiled kernel."""
        s, cfg = self.spec, self.config
        n_blocks = self.table.shape[0]
        launch, kwargs = (self.kernel.warmup, {"grid": cfg["grid"]}) if warmup else (self.kernel[cfg["grid"]], {})
        return launch(
            self.table, tokens, self.embedding, self.residual, self.pending, self.xz, self.xdbl, self.y, self.h,
            self.sync, n_blocks, s["d"], s["d_inner"], s["dt_rank"], s["d_state"], s["n_experts"], s["ffn"],
            float(s["eps"]),
            HAS_IN_BIAS=bool(s["in_bias"]), HAS_CONV_BIAS=bool(s["conv_bias"]), HAS_OUT_BIAS=bool(s["out_bias"]),
            HAS_ROUTER_BIAS=bool(s["router_bias"]), SOFTMAX=s["router"] == "softmax_topk",
            ACTIVATION=ACTIVATION_CODES[s["activation"]], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            **cfg["constexprs"], **pdl_launch(tokens),
            **({"trace_ptr": self.trace, "TRACE": True, "TRACE_BASE": self.trace_base} if self.trace is not None
               else {}), **kwargs)

    def timeline(self) -> list[dict]:
        """After a call with trace=True: program 0's view of each phase, in order: {"phase", "work_us" (from passing
        its barrier to arriving at the next), "wait_us" (at the barrier before it: the slowest program's lag plus the
        barrier's own latency)}. A device sync."""
        if self.trace is None:
            raise ValueError("timeline: this launcher was made without trace=True")
        t = self.trace.tolist()
        rows = []
        # slot 0: start; barrier k: entry 1 + 2k, exit 2 + 2k; the end: the slot after the last exit
        starts = [t[0]] + [t[2 + 2 * k] for k in range(len(self.phases) - 1)]
        ends = [t[1 + 2 * k] for k in range(len(self.phases) - 1)] + [t[2 * len(self.phases) - 1]]
        waits = [0.0] + [(t[2 + 2 * k] - t[1 + 2 * k]) / 1e3 for k in range(len(self.phases) - 1)]
        for name, start, end, wait in zip(self.phases, starts, ends, waits):
            rows.append({"phase": name, "work_us": (end - start) / 1e3, "wait_us": wait})
        # inside A and E (each block's first phase): the norm (+ route) part, then the weight loop
        first = 0
        for b, kind in enumerate(self.kinds):
            mid, end = t[self.trace_base + 2 * b], t[self.trace_base + 2 * b + 1]
            rows[first]["prologue_us"] = (mid - starts[first]) / 1e3
            rows[first]["loop_us"] = (end - mid) / 1e3
            first += 4 if kind == MAMBA else 2
        return rows

    def check(self):
        """Raise PersistentTimeout if a barrier of any earlier call gave up (a device sync)."""
        if int(self.sync[2]) != 0:
            raise PersistentTimeout("persistent decode: a grid barrier timed out (were all programs resident? another "
                                    "process sharing the GPU can prevent it); run with persistent=False")
