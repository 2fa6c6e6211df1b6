"""Mamba-1 selective scan over a sequence (prefill), in Triton, beside its reference.

Grid: (batch, channel blocks of BLOCK_D). A program's state is a vector of R = BLOCK_D * BLOCK_N rows, one per
(channel, state) pair, kept in fp32 registers; the program walks the sequence in chunks of CHUNK steps. Every per-step
input is loaded as an (R, CHUNK) tile (u/dt/z rows repeat per channel, B/C rows per state), so all of a chunk's work
lives in ONE 2-D layout: the recurrence h_t = a_t * h_{t-1} + b_t (a = exp(dt * A), b = dt * u * B) is solved by an
associative scan along the chunk axis, the carried-in state applied (h_t = prod(a) * h_in + scanned b), and
y_t = <h_t, C_t> summed over each channel's BLOCK_N rows. (A first version scanned a 3-D (BLOCK_D, N, CHUNK) tile; the
layout conversions between its 2-D and 3-D values cost ~10 us per chunk on the H100.) Steps past the end and padded
channels/states get a = 1, b = 0, so they leave h as it is. Inputs are read through strides: channel-major u/dt/z
(time contiguous, as the torch-fast runner passes them) load CHUNK-long vectors per row. y takes u's layout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mambadeploy.models.ref_ops import selective_scan_ref  # noqa: F401  (the reference, re-exported beside the kernel)

from .common import LOG2E, fsum, next_pow2, sigmoid, softplus
from .interpret import is_interpreted, kernel_for

# (BLOCK_D, CHUNK, num_warps) on a GPU: the best of benchmarks/sweep_kernels.py on the H100 (2.8B, L = 2048,
# channel-major inputs as the runner passes them): 320 us, against 389 us for (2, 32, 1) and 495-750 us for wider blocks
SCAN_TILE = (1, 64, 2)


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


def launch_config(shapes, dtypes=None, interpret: bool = False) -> dict:
    """shapes: input shapes in the SelectiveScan op order (u, delta, A, B, C, D, z, delta_bias, initial_state); only
    u (batch, dim, L) and A (dim, N) matter. dtypes: unused (the kernel's tiles are fp32 whatever the inputs).
    interpret: Triton's CPU interpreter runs each program and each scan element in Python, so there the blocks are as
    wide as possible and CHUNK = 1 (a plain step-by-step recurrence); GPU launches never set it."""
    batch, dim, _ = shapes[0]
    d_state = shapes[2][1]
    block_n = next_pow2(d_state)
    if interpret:
        block_d = min(next_pow2(dim), max(1, 256 // block_n))
        return {"kernel": "selective_scan_kernel", "grid": (batch, triton.cdiv(dim, block_d)), "num_warps": 4,
                "num_stages": 1, "constexprs": {"BLOCK_D": block_d, "BLOCK_N": block_n, "CHUNK": 1}}
    block_d, chunk, warps = SCAN_TILE
    return {
        "kernel": "selective_scan_kernel",
        "grid": (batch, triton.cdiv(dim, block_d)),
        "num_warps": warps,
        "num_stages": 1,
        "constexprs": {"BLOCK_D": block_d, "BLOCK_N": block_n, "CHUNK": chunk},
    }


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
    kernel = kernel_for(selective_scan_kernel, u)
    cfg = config or launch_config((u.shape, delta.shape, A.shape), interpret=is_interpreted(kernel))
    h0 = initial_state
    zs = z.stride() if z is not None else (0, 0, 0)
    h0s = h0.stride() if h0 is not None else (0, 0, 0)
    kernel[cfg["grid"]](
        u, delta, A, B, C, D if D is not None else u, z if z is not None else u,
        delta_bias if delta_bias is not None else u, h0 if h0 is not None else u, y, h_last,
        dim, L, d_state,
        *u.stride(), *delta.stride(), *zs, *y.stride(), *B.stride(), *C.stride(), *A.stride(), *h0s, *h_last.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DELTA_BIAS=delta_bias is not None,
        DELTA_SOFTPLUS=bool(delta_softplus), HAS_H0=h0 is not None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **cfg["constexprs"],
    )
    return y, h_last
