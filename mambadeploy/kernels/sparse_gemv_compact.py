"""Compacting SCAP sparse GEMV for decode (batch 1-4): y = s(x) · Wᵀ + b, s(x) = (x − m)·[|x − m| > t], fused:
the MoE expert sites' kernel of torch-fast's per-site choice (runtime/fast_sparse.py); kernels/sparse_gemv.py keeps
the first, predicated kernel and the references.

The weight is stored transposed, wt (K, N): input feature k owns the contiguous row wt[k, :], so an activation that the
threshold drops skips a whole contiguous row. A row is read when *any* row of the batch keeps feature k.

Why compaction: a GEMV is bound by the bytes in flight, and a predicated tile costs a full loop iteration of latency
while carrying fewer bytes (the predicated kernel ran 2-3x slower than the dense GEMV on the H200). Here each program
owns a chunk of CHUNK_K input features and a wide BLOCK_N column tile. It first compacts its chunk: the kept feature
indices go, in order, to the program's own slot of an index scratch (an exclusive prefix sum gives each its place; one
barrier publishes the list to the program's threads). Its loop then runs over only `count` kept rows (a device value:
the launch shape never depends on data, so the launch is CUDA-graph safe), every iteration a full (BLOCK_J, BLOCK_N)
tile of needed weight bytes. Batch 1 accumulates with fp32 FMAs (or tl.dot, USE_DOT: Triton then pipelines the loads);
batches 2-4 use tl.dot on x padded to 16 rows.

The chunks of one column tile are added deterministically, as in kernels/gemv.py: each writes its fp32 partial to a
workspace and bumps the tile's arrival counter (gemv.py's shared, always-zero counters, reset by the last arriver); the
last to arrive adds the partials in a fixed tree order, adds the bias, optionally runs Mamba's decode conv (in_proj's
x half) and stores y. COMPACT=False keeps the predicated loop (same body), for the speed sweep only.

`sparse_expert_gemv`: one (token, slot) pair per program row group (grid axis 2), each with its own expert's weight wt
(E, K, N) and input row. Its epilogue can apply the gated activation (fc1) and scale by the pair's routing weight (fc2
of a top-1 MoE), so the sparse MoE layer is two launches.

The crash of the first version (commit 674d32b: "illegal memory access" in torch-fast's graphed step, never in the
kernel sweep): the expert id was loaded BEFORE pdl_wait. Under programmatic dependent launch fc1 starts while the
router kernel that writes that id is still running (every decode kernel lets its successor launch right after its
own wait), so fc1 read a stale or uninitialised id and addressed wt[e] far outside the weights; the sweep passed host
ids, written long before. Now nothing is read before the wait (tests/kernels/test_kernel_compile.py checks the sm_90
PTX: no global load ahead of griddepcontrol.wait), and an id outside [0, E) — which the router never writes — reads
nothing and gives a zero row instead of an out-of-bounds address (checked against a guard buffer in the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    ACTIVATION_CODES,
    TARGET_PROGRAMS,
    activate,
    cdiv,
    cumsum,
    dot_precision,
    dot_upcast,
    fmax,
    fsum,
    next_pow2,
    pdl_launch,
    pdl_wait,
)
from .gemv import COUNTER_SLOTS, _conv_arguments, _conv_epilogue, _counter_buffer
from .interpret import is_interpreted, kernel_for
from .sparse_gemv import MAX_BATCH, sparse_expert_gemv_ref, sparse_gemv_ref  # noqa: F401 (the references)

# Programs a sparse launch aims at: a batch-1 program has one tile of kept rows in flight at a time (the FMA loop is
# not pipelined) and a chunk keeps only part of its rows, so it takes ~4 programs an SM (132) to keep enough bytes in
# flight; the K chunks this needs are added by the last arriver from L2. A guess until the sweep has run.
SPARSE_PROGRAMS = 2 * TARGET_PROGRAMS
REDUCE_ELEMENTS = 8192  # partials one reduce step of the last arriver loads at once (RED splits x rows x BLOCK_N)


@triton.jit
def _finish(out, up, offs_m, mask_m, offs_n, mask_n, N, y_ptr, s_ym, b_base, bias_ok, scale, HAS_BIAS: tl.constexpr,
            GATED: tl.constexpr, ACTIVATION: tl.constexpr, ROW_SCALE: tl.constexpr, cs_ptr, cw_ptr, cb_ptr,
            conv_dim, s_cs_b, s_cs_d, s_cs_k, s_cw_d, s_cw_k, CONV_K: tl.constexpr, HAS_CONV_BIAS: tl.constexpr):
    """The finished fp32 sums of one column tile: + bias; the optional decode conv (in_proj), gated activation
    act(gate) * up (fc1; `up` holds the sums of the columns N later) or routing-weight scale (fc2); stored in y's
    dtype, rounding where the reference's separate ops round."""
    dt = y_ptr.dtype.element_ty
    if HAS_BIAS:
        # (bias_ok broadcast by hand: the interpreter refuses a scalar flag and-ed into a vector mask)
        b_mask = mask_n & (offs_n * 0 + bias_ok.to(tl.int32) > 0)
        out += tl.load(b_base + offs_n, mask=b_mask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            up += tl.load(b_base + N + offs_n, mask=b_mask, other=0.0).to(tl.float32)[None, :]
    if CONV_K > 0:
        out = _conv_epilogue(out, offs_m, mask_m, offs_n, mask_n, dt, cs_ptr, cw_ptr, cb_ptr,
                             conv_dim, s_cs_b, s_cs_d, s_cs_k, s_cw_d, s_cw_k, CONV_K, HAS_CONV_BIAS)
    if GATED:
        out = activate(out.to(dt).to(tl.float32), ACTIVATION).to(dt).to(tl.float32) * up.to(dt).to(tl.float32)
    if ROW_SCALE:
        out = out.to(dt).to(tl.float32) * scale
    tl.store(y_ptr + offs_m[:, None] * s_ym + offs_n[None, :], out.to(dt), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:  # the interpreter's bf16 dot (common.dot_upcast)
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def compact_sparse_gemv_kernel(
    x_ptr, wt_ptr, bias_ptr, y_ptr, expert_ptr, idx_ptr, part_ptr, count_ptr, scale_ptr,
    B, K, N, s_xm, s_ym, s_wk, s_we, n_experts, mode, threshold,
    HAS_BIAS: tl.constexpr, PER_ROW_EXPERT: tl.constexpr, GATED: tl.constexpr, ACTIVATION: tl.constexpr,
    ROW_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr,
    CHUNK_K: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, RED: tl.constexpr,
    COMPACT: tl.constexpr, USE_DOT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    PDL: tl.constexpr = False,
    cs_ptr=None, cw_ptr=None, cb_ptr=None, conv_dim=0, s_cs_b=0, s_cs_d=0, s_cs_k=0, s_cw_d=0, s_cw_k=0,
    CONV_K: tl.constexpr = 0, HAS_CONV_BIAS: tl.constexpr = False,
):
    """Program (column tile n, K chunk c, row group r). Dense layers: one row group, the batch's B rows sharing wt.
    Experts (PER_ROW_EXPERT): row group r is pair r, one row, its expert's weight and bias. N: output columns; s_wk:
    a weight row's length (2N when GATED: the tile also accumulates the `up` columns N further on)."""
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_r = tl.program_id(2)
    rows = B
    x_base = x_ptr
    w_base = wt_ptr
    b_base = bias_ptr
    # Nothing is read before the wait: x, and for the experts the expert id (written by the router kernel, which
    # under PDL may still be running when this kernel starts: reading the id earlier was the crash of 674d32b).
    pdl_wait(PDL)
    pair_ok = pid_n >= 0  # (always true: a runtime flag, false only for an expert pair with an invalid id)
    if PER_ROW_EXPERT:
        rows = 1
        x_base = x_ptr + pid_r * s_xm
        e = tl.load(expert_ptr + pid_r).to(tl.int64)
        pair_ok = (e >= 0) & (e < n_experts)  # an id outside [0, E): no weight or bias is read, its output row is 0
        e = tl.where(pair_ok, e, 0)
        w_base = wt_ptr + e * s_we
        b_base = bias_ptr + e * s_wk
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    k_start = pid_c * CHUNK_K
    n_rows = tl.where(pair_ok, tl.minimum(K - k_start, CHUNK_K), 0)
    if COMPACT:  # the kept features of this chunk, in order, into this program's own scratch slot
        slot = idx_ptr + ((pid_r * SPLIT + pid_c) * tl.num_programs(0) + pid_n).to(tl.int64) * CHUNK_K
        chunk = k_start + tl.arange(0, CHUNK_K)  # (names apart from the loop's: Triton keeps one type a name)
        in_chunk = chunk < K
        x_chunk = tl.load(x_base + offs_m[:, None] * s_xm + chunk[None, :], mask=mask_m[:, None] & in_chunk[None, :],
                          other=0.0)
        kept = (tl.abs(x_chunk.to(tl.float32) - mode) > threshold) & mask_m[:, None] & in_chunk[None, :] & pair_ok
        listed = fmax(kept.to(tl.int32), 0)  # (CHUNK_K,): some row of the batch keeps feature k
        place = cumsum(listed, 0) - listed
        n_rows = fsum(listed, 0)
        tl.store(slot + place, chunk, mask=listed > 0)
        tl.debug_barrier()  # the whole list is written before any thread reads another thread's entries
    if USE_DOT:
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    else:
        acc = tl.full((BLOCK_J, BLOCK_N), 0.0, tl.float32)
    acc_up = acc  # GATED only (unused otherwise, then compiled away)
    for j0 in range(0, n_rows, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        live = js < n_rows
        if COMPACT:
            kk = tl.load(slot + js, mask=live, other=0)
        else:
            kk = k_start + js
        xv = tl.load(x_base + offs_m[:, None] * s_xm + kk[None, :], mask=mask_m[:, None] & live[None, :], other=0.0)
        xc = xv.to(tl.float32) - mode
        keep = (tl.abs(xc) > threshold) & mask_m[:, None] & live[None, :]
        xs = tl.where(keep, xc, 0.0).to(xv.dtype)  # rounded to the model dtype, as the reference's sparsified input
        if COMPACT:  # every listed row is needed: the weight load waits on the index only, not on x
            need = live
        else:
            need = fmax(keep.to(tl.int32), 0) > 0
        w_at = w_base + kk.to(tl.int64)[:, None] * s_wk + offs_n[None, :]
        w = tl.load(w_at, mask=need[:, None] & mask_n[None, :], other=0.0)
        if GATED:
            w_up = tl.load(w_at + N, mask=need[:, None] & mask_n[None, :], other=0.0)
        if USE_DOT:  # (Triton pipelines the loads of a loop that feeds tl.dot, num_stages; not those of the FMA loop)
            acc = _dot(xs, w, acc, UPCAST, PRECISION)
            if GATED:
                acc_up = _dot(xs, w_up, acc_up, UPCAST, PRECISION)
        else:  # BLOCK_M == 1: one row of x along the tile's J axis
            x_col = tl.reshape(xs.to(tl.float32), (BLOCK_J, ))[:, None]
            acc += x_col * w.to(tl.float32)
            if GATED:
                acc_up += x_col * w_up.to(tl.float32)
    if USE_DOT:
        out, up = acc, acc_up
    else:
        out, up = fsum(acc, 0)[None, :], fsum(acc_up, 0)[None, :]  # (1, BLOCK_N)
    scale = 0.0
    if ROW_SCALE:
        scale = tl.load(scale_ptr + pid_r).to(tl.float32)
    if SPLIT == 1:
        _finish(out, up, offs_m, mask_m, offs_n, mask_n, N, y_ptr + pid_r * s_ym, s_ym, b_base, pair_ok, scale,
                HAS_BIAS, GATED, ACTIVATION, ROW_SCALE, cs_ptr, cw_ptr, cb_ptr, conv_dim, s_cs_b, s_cs_d, s_cs_k,
                s_cw_d, s_cw_k, CONV_K, HAS_CONV_BIAS)
    else:  # workspace (row groups, SPLIT, BLOCK_B, s_wk) fp32: the up partials N columns after the gate's
        part = part_ptr + (pid_r * SPLIT * BLOCK_B).to(tl.int64) * s_wk
        part_at = part + (pid_c * BLOCK_B + offs_m[:, None]) * s_wk + offs_n[None, :]
        tl.store(part_at, out, mask=mask_m[:, None] & mask_n[None, :])
        if GATED:
            tl.store(part_at + N, up, mask=mask_m[:, None] & mask_n[None, :])
        tl.debug_barrier()  # every thread's partial is written before the arrival is counted (release, gpu scope)
        counter = count_ptr + pid_r * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(counter, 1)
        if arrived == SPLIT - 1:  # the last program of this column tile: add the partials in a fixed order
            offs_b = tl.arange(0, BLOCK_B)
            mask_b = offs_b < rows
            total = tl.full((BLOCK_B, BLOCK_N), 0.0, tl.float32)
            total_up = total
            for s0 in range(0, SPLIT, RED):
                ss = s0 + tl.arange(0, RED)
                at = part + ((ss[:, None, None] * BLOCK_B + offs_b[None, :, None]) * s_wk + offs_n[None, None, :])
                m3 = (ss < SPLIT)[:, None, None] & mask_b[None, :, None] & mask_n[None, None, :]
                total += fsum(tl.load(at, mask=m3, other=0.0, cache_modifier=".cg"), 0)
                if GATED:
                    total_up += fsum(tl.load(at + N, mask=m3, other=0.0, cache_modifier=".cg"), 0)
            _finish(total, total_up, offs_b, mask_b, offs_n, mask_n, N, y_ptr + pid_r * s_ym, s_ym, b_base, pair_ok,
                    scale, HAS_BIAS, GATED, ACTIVATION, ROW_SCALE, cs_ptr, cw_ptr, cb_ptr, conv_dim, s_cs_b, s_cs_d,
                    s_cs_k, s_cw_d, s_cw_k, CONV_K, HAS_CONV_BIAS)
            tl.store(counter, 0)


def launch_config(K: int, N: int, B: int, row_groups: int = 1, interpreted: bool = False, *, block_n=None,
                  chunk_k=None, block_j=None, num_warps=None, num_stages=None, compact: bool = True,
                  use_dot=None) -> dict:
    """A plain function of the shapes (the keyword arguments override one choice each, for the speed sweep).
    B: rows of x per program (dense: the batch; experts: 1); row_groups: programs along rows (experts: the pairs).
    Tiles from _tiles; BLOCK_J = 32 kept rows an iteration (a 32 x 256 bf16 tile is 16 KB), FMAs over 8 warps at
    batch 1 (not pipelined: programs x tile are the bytes in flight), tl.dot with 3 stages at 2-4. Unmeasured
    defaults until benchmarks/sweep_sparse_gemv.py has run on the H200: take its best configs from there."""
    use_dot = B > 1 if use_dot is None else use_dot
    if B > 1 and not use_dot:
        raise ValueError(f"sparse_gemv: the FMA loop takes one row of x, {B} rows need use_dot")
    block_m = max(16, next_pow2(B)) if use_dot else 1
    block_b = next_pow2(B)
    if interpreted:  # narrow tiles: CPU tests cover several chunks, column tiles and loop iterations
        auto, defaults = (16, 32), (16 if use_dot else 8, 4, 1)
    else:
        auto, defaults = _tiles(K, N, block_b, row_groups), (32, 4 if use_dot else 8, 3 if use_dot else 1)
    block_n, chunk_k = block_n or auto[0], chunk_k or auto[1]
    if chunk_k != next_pow2(chunk_k) or block_n != next_pow2(block_n):
        raise ValueError(f"sparse_gemv: CHUNK_K {chunk_k} and BLOCK_N {block_n} must be powers of two")
    block_j = min(block_j or defaults[0], chunk_k)
    if use_dot and block_j < 16:
        raise ValueError(f"sparse_gemv: tl.dot needs BLOCK_J >= 16, got {block_j}")
    split = cdiv(K, chunk_k)
    red = max(1, min(next_pow2(split), REDUCE_ELEMENTS // (block_b * block_n)))
    return {"grid": (cdiv(N, block_n), split, row_groups), "num_warps": num_warps or defaults[1],
            "num_stages": num_stages or defaults[2],
            "constexprs": {"BLOCK_M": block_m, "BLOCK_B": block_b, "CHUNK_K": chunk_k, "BLOCK_J": block_j,
                           "BLOCK_N": block_n, "SPLIT": split, "RED": red, "COMPACT": compact, "USE_DOT": use_dot}}


def _tiles(K: int, N: int, block_b: int, row_groups: int) -> tuple[int, int]:
    """(BLOCK_N, CHUNK_K) on a GPU: the widest column tile, then the largest chunk, that reach SPARSE_PROGRAMS
    programs while the last arriver adds a tile's partials in one reduce step (splits <= REDUCE_ELEMENTS / tile); the
    most programs when none does (x_proj: one narrow column tile)."""
    best = (0, (64, 128))
    for block_n in (256, 128, 64):
        if block_n > max(64, next_pow2(N)):
            continue
        for chunk_k in (512, 256, 128, 64, 32):
            split = cdiv(K, chunk_k)
            if split > max(1, REDUCE_ELEMENTS // (block_b * block_n)):
                break
            programs = cdiv(N, block_n) * row_groups * split
            if programs >= SPARSE_PROGRAMS:
                return block_n, chunk_k
            best = max(best, (programs, (block_n, chunk_k)))
    return best[1]


def _launch(x, wt, bias, experts, rows, row_groups, s_we, mode, threshold, config, conv=None, activation=None,
            scale=None):
    kernel = kernel_for(compact_sparse_gemv_kernel, x)
    K, s_wk = x.shape[1], wt.shape[-1]
    N = s_wk // 2 if activation is not None else s_wk  # gated: the output is act(gate) * up, half the columns
    cfg = config or launch_config(K, N, rows, row_groups, is_interpreted(kernel))
    c = cfg["constexprs"]
    grid = cfg["grid"]
    y = torch.empty(x.shape[0], N, dtype=x.dtype, device=x.device)
    idx = part = counters = y  # unused unless compacting / splitting
    if c["COMPACT"]:
        idx = torch.empty(grid[0] * grid[1] * grid[2] * c["CHUNK_K"], dtype=torch.int32, device=x.device)
    if c["SPLIT"] > 1:
        if grid[0] * grid[2] > COUNTER_SLOTS:
            raise ValueError(f"sparse_gemv: split over {grid[0] * grid[2]} column tiles, at most {COUNTER_SLOTS}")
        part = torch.empty(grid[2], c["SPLIT"], c["BLOCK_B"], s_wk, dtype=torch.float32, device=x.device)
        counters = _counter_buffer(x.device)
    conv_args = {} if conv is None else _conv_arguments(conv, x.shape[0], N)
    kernel[grid](x, wt, bias if bias is not None else y, y, experts if experts is not None else y, idx, part, counters,
                 scale if scale is not None else y, rows, K, N, x.stride(0), y.stride(0), s_wk, s_we,
                 wt.shape[0] if experts is not None else 1, float(mode), float(threshold),
                 HAS_BIAS=bias is not None, PER_ROW_EXPERT=experts is not None,
                 GATED=activation is not None, ACTIVATION=ACTIVATION_CODES.get(activation, 0),
                 ROW_SCALE=scale is not None, UPCAST=dot_upcast(x.dtype, is_interpreted(kernel)),
                 PRECISION=dot_precision(x.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **c,
                 **pdl_launch(x), **conv_args)
    return y


def sparse_gemv(x: torch.Tensor, wt: torch.Tensor, mode: float, threshold: float, bias: torch.Tensor | None = None,
                *, config: dict | None = None, conv: tuple | None = None):
    """Same contract as sparse_gemv_ref. x (B, K) with B <= MAX_BATCH, contiguous rows; wt (K, N) contiguous.
    config: launch_config's result (None: its choice for these shapes).
    conv = (conv_state (B, C, d_conv) fp32, conv_weight (C, d_conv), conv_bias (C,) or None): Mamba's decode conv
    fused into the epilogue (in_proj), exactly as gemv's conv: the first C outputs come back as the conv's output."""
    if x.dim() != 2 or wt.dim() != 2 or x.shape[1] != wt.shape[0]:
        raise ValueError(f"sparse_gemv: x {tuple(x.shape)} and wt {tuple(wt.shape)} do not fit (x (B, K), wt (K, N))")
    if x.shape[0] > MAX_BATCH:
        raise ValueError(f"sparse_gemv: batch {x.shape[0]} > {MAX_BATCH}")
    if bias is not None and bias.shape != (wt.shape[1],):
        raise ValueError(f"sparse_gemv: bias {tuple(bias.shape)} for {wt.shape[1]} output features")
    x, wt = x.contiguous(), wt.contiguous()
    return _launch(x, wt, bias, None, x.shape[0], 1, 0, mode, threshold, config, conv=conv)


def sparse_expert_gemv(x: torch.Tensor, wt: torch.Tensor, experts: torch.Tensor, mode: float, threshold: float,
                       bias: torch.Tensor | None = None, *, config: dict | None = None, activation: str | None = None,
                       scale: torch.Tensor | None = None, tiles: dict | None = None):
    """Same contract as sparse_expert_gemv_ref: x (P, K), wt (E, K, N), experts (P,), bias (E, N) -> (P, N); with
    activation (a key of ACTIVATION_CODES; fc1) -> act(gate) * up (P, N / 2); with scale (P,) fp32 routing weights
    (fc2 of a top-1 MoE) -> the output times its weight. Both in the epilogue: no separate launches.
    tiles: launch_config keyword overrides (block_n, chunk_k, ...) when no config is given."""
    if x.dim() != 2 or wt.dim() != 3 or x.shape[1] != wt.shape[1] or experts.shape != (x.shape[0],):
        raise ValueError(f"sparse_expert_gemv: x {tuple(x.shape)}, wt {tuple(wt.shape)}, experts "
                         f"{tuple(experts.shape)} do not fit (x (P, K), wt (E, K, N), experts (P,))")
    if activation is not None and (activation not in ACTIVATION_CODES or wt.shape[2] % 2):
        raise ValueError(f"sparse_expert_gemv: gated activation {activation!r} on {wt.shape[2]} columns (one of "
                         f"{', '.join(ACTIVATION_CODES)}, an even width)")
    if scale is not None and scale.shape != (x.shape[0],):
        raise ValueError(f"sparse_expert_gemv: scale {tuple(scale.shape)} for {x.shape[0]} pairs")
    x, wt, experts = x.contiguous(), wt.contiguous(), experts.contiguous()
    if config is None and tiles is not None:  # launch_config's overrides (the sweep's best tiles of a site)
        config = launch_config(x.shape[1], wt.shape[2] // (2 if activation is not None else 1), 1, x.shape[0],
                               is_interpreted(kernel_for(compact_sparse_gemv_kernel, x)), **tiles)
    return _launch(x, wt, None if bias is None else bias.contiguous(), experts, 1, x.shape[0], wt.stride(0), mode,
                   threshold, config, activation=activation,
                   scale=None if scale is None else scale.float().contiguous())
