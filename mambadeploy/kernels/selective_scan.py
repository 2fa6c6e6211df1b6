"""Mamba-1 selective scan over a sequence (prefill), in Triton, beside its reference. Two kernels:

`selective_scan_seg_kernel` (+ `selective_scan_fold_kernel`): what selective_scan() launches. The sequence is cut into
segments of seg_len steps, parallel over (batch, channel blocks, segments). A program keeps its (BLOCK_D, N) fp32 state
in registers and walks its segment step by step (the recurrence h = exp(dt A) h + dt u B costs one exp2 and two FMAs
per state element, against the log-depth combines of an associative scan), in groups of 4 steps whose input tiles are
loaded one group ahead and taken apart in registers (tl.split), so memory latency is paid once per group. Three
launches when there are several segments: a state pass (each segment but the last from a zero state: end state + sum of
dt), a fold over the segments in order (h <- exp(A * sum dt) h + segment end state: exact, as A is diagonal), and the
output pass (each segment from the folded state at its start, writing y). The workspaces are fp32 and L2-sized.

`selective_scan_kernel`: a single launch (what the TensorRT AOT plugin compiles, plugins/aot_kernels.py). Grid (batch,
channel blocks); R = BLOCK_D * BLOCK_N state rows walk the sequence in chunks of CHUNK steps; every per-step input is an
(R, CHUNK) tile of one 2-D layout, the recurrence is solved by an associative scan along the chunk axis, the carried
state applied, and y summed over each channel's rows. On the H100 it is ~1.6-1.9x slower than the segmented kernel
(benchmarks/HISTORY.md, scan launch configs).

Steps past the end and padded channels/states get dt = 0 (a = 1, b = 0), so they leave h as it is. Inputs are read
through strides (channel-major or token-major); y takes u's layout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mambadeploy.models.ref_ops import selective_scan_ref  # noqa: F401  (the reference, re-exported beside the kernel)

from .common import LOG2E, fsum, load_or_zeros, next_pow2, sigmoid, softplus
from .interpret import is_interpreted, kernel_for

# (BLOCK_D, CHUNK, num_warps) on a GPU: the best of benchmarks/sweep_kernels.py on the H100 (2.8B, L = 2048,
# channel-major inputs as the runner passes them): 320 us, against 389 us for (2, 32, 1) and 495-750 us for wider blocks
# (events around single calls; from CUDA-graph replays 250 us, benchmarks/results/archive/sweep_scan_seg_graphed_*.json)
SCAN_TILE = (1, 64, 2)
# (BLOCK_D, num_warps, seg_len) of the segment-parallel kernel on a GPU, and the segment length from 2048 steps on:
# the H100 sweep at 2.8B, L = 2048, CUDA-graph timing (results/archive/sweep_scan_seg_graphed_*.json): 157 us with
# 64-step segments, 133 us with 128 (the single-launch associative scan: 250 us in the same run). Shorter sequences
# keep 64 (more segments, more programs); not swept.
SEG_TILE = (32, 1, 64)
SEG_LEN_LONG = 128
SEG_LONG_FROM = 2048  # sequences from this length on use SEG_LEN_LONG
FOLD_BLOCK = 1024  # (channel, state) pairs per program of the fold between the scan's two passes


@triton.jit
def _linear_recurrence(a1, b1, a2, b2):
    # h -> a1 h + b1, then h -> a2 h + b2, composed
    return a1 * a2, a2 * b1 + b2


@triton.jit
def selective_scan_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, delta_bias_ptr, h0_ptr, y_ptr, h_last_ptr,
    dim, seqlen, d_state,
    s_u_b, s_u_d, s_u_l,
    s_dt_b, s_dt_d, s_dt_l,
    s_z_b, s_z_d, s_z_l,
    s_y_b, s_y_d, s_y_l,
    s_B_b, s_B_n, s_B_l,
    s_C_b, s_C_n, s_C_l,
    s_A_d, s_A_n,
    s_h0_b, s_h0_d, s_h0_n,
    s_hl_b, s_hl_d, s_hl_n,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    R: tl.constexpr = BLOCK_D * BLOCK_N
    offs_r = tl.arange(0, R)
    r_d = pid_d * BLOCK_D + offs_r // BLOCK_N  # channel of each row
    r_n = offs_r % BLOCK_N  # state index of each row
    mask_r = (r_d < dim) & (r_n < d_state)
    offs_c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # the block's channels (for y)
    mask_c = offs_c < dim
    offs_t = tl.arange(0, CHUNK)

    A2 = tl.load(A_ptr + r_d * s_A_d + r_n * s_A_n, mask=mask_r, other=0.0).to(tl.float32) * LOG2E
    if HAS_H0:
        h = tl.load(h0_ptr + pid_b * s_h0_b + r_d * s_h0_d + r_n * s_h0_n, mask=mask_r, other=0.0).to(tl.float32)
    else:
        h = tl.full((R,), 0.0, tl.float32)
    if HAS_DELTA_BIAS:
        bias = tl.load(delta_bias_ptr + r_d, mask=mask_r, other=0.0).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)

    u_rows = u_ptr + pid_b * s_u_b + r_d[:, None] * s_u_d
    dt_rows = delta_ptr + pid_b * s_dt_b + r_d[:, None] * s_dt_d
    B_rows = B_ptr + pid_b * s_B_b + r_n[:, None] * s_B_n
    C_rows = C_ptr + pid_b * s_C_b + r_n[:, None] * s_C_n
    u_chan = u_ptr + pid_b * s_u_b + offs_c[:, None] * s_u_d
    z_chan = z_ptr + pid_b * s_z_b + offs_c[:, None] * s_z_d
    y_chan = y_ptr + pid_b * s_y_b + offs_c[:, None] * s_y_d
    is_last = (offs_t == CHUNK - 1)[None, :]

    for start in range(0, seqlen, CHUNK):
        t = start + offs_t
        mask_t = t < seqlen
        m = mask_r[:, None] & mask_t[None, :]
        u = tl.load(u_rows + t[None, :] * s_u_l, mask=m, other=0.0).to(tl.float32)
        dt = tl.load(dt_rows + t[None, :] * s_dt_l, mask=m, other=0.0).to(tl.float32)
        if HAS_DELTA_BIAS:
            dt = dt + bias[:, None]
        if DELTA_SOFTPLUS:
            dt = softplus(dt)
        dt = tl.where(m, dt, 0.0)  # outside the sequence / padding: a = 1, b = 0
        Bt = tl.load(B_rows + t[None, :] * s_B_l, mask=m, other=0.0).to(tl.float32)
        Ct = tl.load(C_rows + t[None, :] * s_C_l, mask=m, other=0.0).to(tl.float32)

        a = tl.exp2(dt * A2[:, None])  # (R, CHUNK)
        b = dt * u * Bt
        if CHUNK > 1:  # (CHUNK == 1: the interpreter's configuration, whose scan runs element by element in Python)
            a, b = tl.associative_scan((a, b), 1, _linear_recurrence)
        hs = a * h[:, None] + b
        h = fsum(tl.where(is_last, hs, 0.0), 1)  # state after the chunk (masked steps kept it unchanged)
        hc = hs * Ct
        if BLOCK_D == 1:
            y = fsum(hc, 0)[None, :]  # (1, CHUNK)
        else:
            y = fsum(tl.reshape(hc, (BLOCK_D, BLOCK_N, CHUNK)), 1)  # (BLOCK_D, CHUNK): sum each channel's rows

        mc = mask_c[:, None] & mask_t[None, :]
        if HAS_D:
            y += tl.load(u_chan + t[None, :] * s_u_l, mask=mc, other=0.0).to(tl.float32) * Dv[:, None]
        if HAS_Z:
            z = tl.load(z_chan + t[None, :] * s_z_l, mask=mc, other=0.0).to(tl.float32)
            y *= z * sigmoid(z)
        tl.store(y_chan + t[None, :] * s_y_l, y.to(y_ptr.dtype.element_ty), mask=mc)

    tl.store(h_last_ptr + pid_b * s_hl_b + r_d * s_hl_d + r_n * s_hl_n, h, mask=mask_r)


@triton.jit
def _split4(x):
    """(R, 4) -> its 4 columns, each (R,) (register moves: tl.split takes a trailing dimension of 2 apart)."""
    even, odd = tl.split(tl.reshape(x, (x.shape[0], 2, 2)))
    x0, x2 = tl.split(even)
    x1, x3 = tl.split(odd)
    return x0, x1, x2, x3


@triton.jit
def _join4(x0, x1, x2, x3):
    """The inverse of _split4."""
    return tl.reshape(tl.join(tl.join(x0, x2), tl.join(x1, x3)), (x0.shape[0], 4))


@triton.jit
def _step(h, dsum, A2, bias, Dv, u, dt, Bt, Ct, z, valid,
          HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr,
          WRITE_Y: tl.constexpr):
    """One step: h (BLOCK_D, BLOCK_N) <- exp(dt A) h + dt u B; y (BLOCK_D,) = <h, C> + D u, gated by silu(z).
    valid (BLOCK_D,): False past the segment's end and on padded channels, where dt = 0 leaves h unchanged."""
    u = u.to(tl.float32)
    dt = dt.to(tl.float32)
    if HAS_DELTA_BIAS:
        dt = dt + bias
    if DELTA_SOFTPLUS:
        dt = softplus(dt)
    dt = tl.where(valid, dt, 0.0)
    h = tl.exp2(dt[:, None] * A2) * h + (dt * u)[:, None] * Bt.to(tl.float32)[None, :]
    dsum += dt
    y = dsum
    if WRITE_Y:
        y = fsum(h * Ct.to(tl.float32)[None, :], 1)
        if HAS_D:
            y += Dv * u
        if HAS_Z:
            z = z.to(tl.float32)
            y *= z * sigmoid(z)
    return h, dsum, y


@triton.jit
def _load_group(u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, mask_d, mask_n, tg, t1, s_u_l, s_dt_l, s_z_l, s_B_l, s_C_l,
                HAS_Z: tl.constexpr, WRITE_Y: tl.constexpr):
    """The (BLOCK_D, 4) tiles of u / dt / z and the (BLOCK_N, 4) tiles of B / C for steps tg .. tg+3 (zeros past
    t1): a group's loads are all in flight together."""
    ts = tg + tl.arange(0, 4)
    mt = ts < t1
    m_d = mask_d[:, None] & mt[None, :]
    m_n = mask_n[:, None] & mt[None, :]
    U = tl.load(u_ptr[:, None] + ts[None, :] * s_u_l, mask=m_d, other=0.0)
    DT = tl.load(dt_ptr[:, None] + ts[None, :] * s_dt_l, mask=m_d, other=0.0)
    BT = tl.load(B_ptr[:, None] + ts[None, :] * s_B_l, mask=m_n, other=0.0)
    CT = BT
    Z = U
    if WRITE_Y:
        CT = tl.load(C_ptr[:, None] + ts[None, :] * s_C_l, mask=m_n, other=0.0)
        if HAS_Z:
            Z = tl.load(z_ptr[:, None] + ts[None, :] * s_z_l, mask=m_d, other=0.0)
    return U, DT, BT, CT, Z


@triton.jit
def _scan_steps(h, dsum, A2, bias, Dv, u_ptr, dt_ptr, z_ptr, y_ptr, B_ptr, C_ptr, mask_d, mask_n,
                t0, t1, s_u_l, s_dt_l, s_z_l, s_y_l, s_B_l, s_C_l,
                HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr,
                WRITE_Y: tl.constexpr):
    """Steps t0 .. t1-1 of the recurrence, sequentially, in groups of 4 whose loads are issued one group ahead (a
    step's own loads would leave the loop waiting on memory every step): h (BLOCK_D, BLOCK_N) fp32 state, dsum
    (BLOCK_D,) the sum of the steps' dt (a segment's total decay is exp(A * sum dt), A being diagonal). *_ptr point at
    (batch, channel / state) row starts; WRITE_Y = False is the state-only pass (no C, z, y).
    (Measured on the H100 against a variant that loads each step's vectors on their own and keeps the state
    transposed, every channel's states in one thread, no shared memory: the grouped tiles were ~1.5x faster.)"""
    U, DT, BT, CT, Z = _load_group(u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, mask_d, mask_n, t0, t1,
                                   s_u_l, s_dt_l, s_z_l, s_B_l, s_C_l, HAS_Z, WRITE_Y)
    for tg in range(t0, t1, 4):
        Un, DTn, BTn, CTn, Zn = _load_group(u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, mask_d, mask_n, tg + 4, t1,
                                            s_u_l, s_dt_l, s_z_l, s_B_l, s_C_l, HAS_Z, WRITE_Y)
        u0, u1, u2, u3 = _split4(U)
        d0, d1, d2, d3 = _split4(DT)
        b0, b1, b2, b3 = _split4(BT)
        c0, c1, c2, c3 = _split4(CT)
        z0, z1, z2, z3 = _split4(Z)
        h, dsum, y0 = _step(h, dsum, A2, bias, Dv, u0, d0, b0, c0, z0, mask_d & (tg < t1),
                            HAS_D, HAS_Z, HAS_DELTA_BIAS, DELTA_SOFTPLUS, WRITE_Y)
        h, dsum, y1 = _step(h, dsum, A2, bias, Dv, u1, d1, b1, c1, z1, mask_d & (tg + 1 < t1),
                            HAS_D, HAS_Z, HAS_DELTA_BIAS, DELTA_SOFTPLUS, WRITE_Y)
        h, dsum, y2 = _step(h, dsum, A2, bias, Dv, u2, d2, b2, c2, z2, mask_d & (tg + 2 < t1),
                            HAS_D, HAS_Z, HAS_DELTA_BIAS, DELTA_SOFTPLUS, WRITE_Y)
        h, dsum, y3 = _step(h, dsum, A2, bias, Dv, u3, d3, b3, c3, z3, mask_d & (tg + 3 < t1),
                            HAS_D, HAS_Z, HAS_DELTA_BIAS, DELTA_SOFTPLUS, WRITE_Y)
        if WRITE_Y:
            ts = tg + tl.arange(0, 4)
            tl.store(y_ptr[:, None] + ts[None, :] * s_y_l, _join4(y0, y1, y2, y3).to(y_ptr.dtype.element_ty),
                     mask=mask_d[:, None] & (ts < t1)[None, :])
        U, DT, BT, CT, Z = Un, DTn, BTn, CTn, Zn
    return h, dsum


@triton.jit
def selective_scan_seg_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, delta_bias_ptr, h0_ptr, y_ptr, h_last_ptr,
    hseg_ptr, dseg_ptr,
    dim, seqlen, d_state, seg_len, n_seg,
    s_u_b, s_u_d, s_u_l,
    s_dt_b, s_dt_d, s_dt_l,
    s_z_b, s_z_d, s_z_l,
    s_y_b, s_y_d, s_y_l,
    s_B_b, s_B_n, s_B_l,
    s_C_b, s_C_n, s_C_l,
    s_A_d, s_A_n,
    s_h0_b, s_h0_d, s_h0_n,
    s_hl_b, s_hl_d, s_hl_n,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, STATE_PASS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Segment-parallel scan, grid (batch, channel blocks, segments of seg_len steps), two roles:
    STATE_PASS: each segment but the last runs from a zero state and writes its end state and its sum of dt to the
    fp32 workspaces hseg (batch, n_seg, dim, BLOCK_N) / dseg (batch, n_seg, dim); selective_scan_fold_kernel then
    turns hseg[s] into the true state at the end of segment s. Output pass: a segment starts from hseg[s - 1] (the
    initial state for the first) and runs its steps writing y; the last segment writes the final state."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    seg = tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < d_state
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A2 = tl.load(A_ptr + offs_d[:, None] * s_A_d + offs_n[None, :] * s_A_n, mask=mask_dn, other=0.0).to(tl.float32)
    A2 = A2 * LOG2E
    bias = load_or_zeros(delta_bias_ptr, offs_d, mask_d, HAS_DELTA_BIAS, BLOCK_D)
    Dv = load_or_zeros(D_ptr, offs_d, mask_d, HAS_D, BLOCK_D)
    ws_dn = (pid_b * n_seg * dim + offs_d[:, None]) * BLOCK_N + offs_n[None, :]  # workspace (b, 0, d, n)
    h = tl.full((BLOCK_D, BLOCK_N), 0.0, tl.float32)
    if not STATE_PASS:
        if seg > 0:
            h = tl.load(hseg_ptr + ws_dn + (seg - 1) * dim * BLOCK_N, mask=mask_dn, other=0.0)
        elif HAS_H0:
            h = tl.load(h0_ptr + pid_b * s_h0_b + offs_d[:, None] * s_h0_d + offs_n[None, :] * s_h0_n, mask=mask_dn,
                        other=0.0).to(tl.float32)
    t0 = seg * seg_len
    t1 = tl.minimum(t0 + seg_len, seqlen)
    h, dsum = _scan_steps(
        h, tl.full((BLOCK_D,), 0.0, tl.float32), A2, bias, Dv,
        u_ptr + pid_b * s_u_b + offs_d * s_u_d, delta_ptr + pid_b * s_dt_b + offs_d * s_dt_d,
        z_ptr + pid_b * s_z_b + offs_d * s_z_d, y_ptr + pid_b * s_y_b + offs_d * s_y_d,
        B_ptr + pid_b * s_B_b + offs_n * s_B_n, C_ptr + pid_b * s_C_b + offs_n * s_C_n,
        mask_d, mask_n, t0, t1, s_u_l, s_dt_l, s_z_l, s_y_l, s_B_l, s_C_l,
        HAS_D, HAS_Z, HAS_DELTA_BIAS, DELTA_SOFTPLUS, not STATE_PASS)
    if STATE_PASS:
        tl.store(hseg_ptr + ws_dn + seg * dim * BLOCK_N, h, mask=mask_dn)
        tl.store(dseg_ptr + pid_b * n_seg * dim + seg * dim + offs_d, dsum, mask=mask_d)
    elif seg == n_seg - 1:
        tl.store(h_last_ptr + pid_b * s_hl_b + offs_d[:, None] * s_hl_d + offs_n[None, :] * s_hl_n, h, mask=mask_dn)


@triton.jit
def selective_scan_fold_kernel(
    A_ptr, h0_ptr, hseg_ptr, dseg_ptr, dim, d_state, n_seg, s_A_d, s_A_n, s_h0_b, s_h0_d, s_h0_n,
    HAS_H0: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK: tl.constexpr,
):
    """Between the two passes, grid (batch, blocks of BLOCK (channel, state) pairs): walks the segments in order,
    h <- exp(A * dsum[s]) h + hseg[s] from the initial state, overwriting hseg[s] with the true state at the end of
    segment s (s < n_seg - 1)."""
    pid_b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # (channel, state) pairs in the workspace's (d, n) order
    d = offs // BLOCK_N
    n = offs % BLOCK_N
    mask = (d < dim) & (n < d_state)
    A2 = tl.load(A_ptr + d * s_A_d + n * s_A_n, mask=mask, other=0.0).to(tl.float32) * LOG2E
    h = tl.full((BLOCK,), 0.0, tl.float32)
    if HAS_H0:
        h = tl.load(h0_ptr + pid_b * s_h0_b + d * s_h0_d + n * s_h0_n, mask=mask, other=0.0).to(tl.float32)
    ws = pid_b * n_seg * dim * BLOCK_N + offs
    for s in range(0, n_seg - 1):
        dsum = tl.load(dseg_ptr + pid_b * n_seg * dim + s * dim + d, mask=mask, other=0.0)
        h = tl.exp2(A2 * dsum) * h + tl.load(hseg_ptr + ws + s * dim * BLOCK_N, mask=mask, other=0.0)
        tl.store(hseg_ptr + ws + s * dim * BLOCK_N, h, mask=mask)


def launch_config(shapes, dtypes=None, interpret: bool = False) -> dict:
    """shapes: input shapes in the SelectiveScan op order (u, delta, A, B, C, D, z, delta_bias, initial_state); only
    u (batch, dim, L) and A (dim, N) matter. dtypes: unused (the state is fp32 whatever the inputs).
    The segment-parallel kernel (`selective_scan_seg_kernel`; when L > seg_len three launches: the state pass, the
    fold, the output pass) on a GPU and in the interpreter; "scalars" holds its runtime segment length and count.
    interpret: Triton's CPU interpreter runs each program in Python, so there the blocks are as wide as possible and
    the whole sequence is one segment; GPU launches never set it."""
    batch, dim, L = shapes[0]
    d_state = shapes[2][1]
    block_n = next_pow2(d_state)
    if interpret:
        block_d, warps, seg_len = min(next_pow2(dim), max(1, 256 // block_n)), 4, max(int(L), 1)
    else:
        block_d, warps, seg_len = SEG_TILE
        if L >= SEG_LONG_FROM:
            seg_len = SEG_LEN_LONG
    n_seg = triton.cdiv(max(int(L), 1), seg_len)
    return {
        "kernel": "selective_scan_seg_kernel",
        "grid": (batch, triton.cdiv(dim, block_d), n_seg),
        "num_warps": warps,
        "num_stages": 1,
        "constexprs": {"BLOCK_D": block_d, "BLOCK_N": block_n},
        "scalars": {"seg_len": seg_len, "n_seg": n_seg},
    }


def chunked_launch_config(shapes, dtypes=None, interpret: bool = False) -> dict:
    """The single-launch associative-scan kernel (`selective_scan_kernel`, what the TensorRT AOT plugin compiles):
    grid (batch, channel blocks); CHUNK = 1 in the interpreter (whose scan runs element by element in Python)."""
    batch, dim, _ = shapes[0]
    block_n = next_pow2(shapes[2][1])
    if interpret:
        block_d, chunk, warps = min(next_pow2(dim), max(1, 256 // block_n)), 1, 4
    else:
        block_d, chunk, warps = SCAN_TILE
    return {"kernel": "selective_scan_kernel", "grid": (batch, triton.cdiv(dim, block_d)), "num_warps": warps,
            "num_stages": 1, "constexprs": {"BLOCK_D": block_d, "BLOCK_N": block_n, "CHUNK": chunk}}


_KERNELS = {"selective_scan_kernel": selective_scan_kernel, "selective_scan_seg_kernel": selective_scan_seg_kernel}


def _like_layout(u: torch.Tensor, dtype) -> torch.Tensor:
    """An output of u's shape (batch, dim, L): token-major storage when u is token-major (dim stride 1)."""
    batch, dim, L = u.shape
    if u.stride(1) == 1 and L > 1:
        return torch.empty(batch, L, dim, dtype=dtype, device=u.device).transpose(1, 2)
    return torch.empty(batch, dim, L, dtype=dtype, device=u.device)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
                   *, config: dict | None = None):
    """Same contract as selective_scan_ref: u, delta, z: (batch, dim, L) in any layout; A: (dim, N);
    B, C: (batch, N, L); D, delta_bias: (dim,); initial_state: (batch, dim, N) or None.
    Returns (y (batch, dim, L) in u.dtype, last_state (batch, dim, N) fp32).
    `config` overrides launch_config (benchmark sweeps)."""
    batch, dim, L = u.shape
    d_state = A.shape[1]
    if delta.shape != u.shape or (z is not None and z.shape != u.shape):
        raise ValueError(f"selective_scan: delta {tuple(delta.shape)} / z must match u {tuple(u.shape)}")
    if A.shape[0] != dim or B.shape != (batch, d_state, L) or C.shape != (batch, d_state, L):
        raise ValueError(f"selective_scan: A {tuple(A.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)} do not fit "
                         f"u {tuple(u.shape)}")
    y = _like_layout(u, u.dtype)
    h_last = torch.empty(batch, dim, d_state, dtype=torch.float32, device=u.device)
    if L == 0:
        h_last.copy_(initial_state if initial_state is not None else torch.zeros_like(h_last))
        return y, h_last
    interp = is_interpreted(kernel_for(selective_scan_kernel, u))
    cfg = config or launch_config((u.shape, delta.shape, A.shape), interpret=interp)
    kernel = kernel_for(_KERNELS[cfg["kernel"]], u)
    h0 = initial_state
    zs = z.stride() if z is not None else (0, 0, 0)
    h0s = h0.stride() if h0 is not None else (0, 0, 0)
    common = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_DELTA_BIAS=delta_bias is not None,
                  DELTA_SOFTPLUS=bool(delta_softplus), HAS_H0=h0 is not None,
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **cfg["constexprs"])
    pointers = (u, delta, A, B, C, D if D is not None else u, z if z is not None else u,
                delta_bias if delta_bias is not None else u, h0 if h0 is not None else u, y, h_last)
    strides = (*u.stride(), *delta.stride(), *zs, *y.stride(), *B.stride(), *C.stride(), *A.stride(), *h0s,
               *h_last.stride())
    if cfg["kernel"] == "selective_scan_kernel":
        kernel[cfg["grid"]](*pointers, dim, L, d_state, *strides, **common)
        return y, h_last
    seg_len, n_seg = cfg["scalars"]["seg_len"], cfg["scalars"]["n_seg"]
    block_n = cfg["constexprs"]["BLOCK_N"]
    if n_seg > 1:  # per-segment end states and dt sums (fp32; L2-sized at model shapes), folded between the passes
        hseg = torch.empty(batch, n_seg, dim, block_n, dtype=torch.float32, device=u.device)
        dseg = torch.empty(batch, n_seg, dim, dtype=torch.float32, device=u.device)
        kernel[(cfg["grid"][0], cfg["grid"][1], n_seg - 1)](
            *pointers, hseg, dseg, dim, L, d_state, seg_len, n_seg, *strides, STATE_PASS=True, **common)
        fold = kernel_for(selective_scan_fold_kernel, u)
        fold[(batch, triton.cdiv(dim * block_n, FOLD_BLOCK))](
            A, h0 if h0 is not None else u, hseg, dseg, dim, d_state, n_seg, *A.stride(), *h0s,
            HAS_H0=h0 is not None, BLOCK_N=block_n, BLOCK=FOLD_BLOCK, num_warps=4, num_stages=1)
    else:
        hseg = dseg = h_last  # never read
    kernel[cfg["grid"]](*pointers, hseg, dseg, dim, L, d_state, seg_len, n_seg, *strides, STATE_PASS=False, **common)
    return y, h_last
