"""One decode step of the selective scan, in Triton, beside its reference. The state is updated IN PLACE.

Grid: (batch, channel blocks of BLOCK_D). A program loads its (BLOCK_D, N) fp32 state, applies
h = exp(dt * A) * h + dt * x * B with dt = softplus(dt + dt_bias), writes h back, and stores y = <h, C> + D x, gated by
silu(z). Each state element is read and written by the same thread, so in-place is safe.
Optionally (dt_proj_weight given) dt arrives low-rank, (batch, R), and the kernel applies the Mamba dt projection
itself, dt = dt_low @ W.T with W (dim, R): one launch fewer per layer and per decode step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mambadeploy.models.ref_ops import selective_state_update_ref  # noqa: F401  (the reference, re-exported)

from .common import (
    LOG2E,
    block_for_programs,
    fsum,
    load_or_zeros,
    next_pow2,
    pdl_launch,
    pdl_wait,
    sigmoid,
    softplus,
)
from .interpret import is_interpreted, kernel_for


@triton.jit
def selective_state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, y_ptr, dt_w_ptr,
    dim, d_state, rank,
    s_st_b, s_st_d, s_st_n,
    s_x_b, s_x_d, s_dt_b, s_dt_d, s_z_b, s_z_d, s_y_b, s_y_d,
    s_B_b, s_B_n, s_C_b, s_C_n, s_A_d, s_A_n, s_w_d, s_w_r,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    DT_LOW_RANK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_n = offs_n < d_state
    mask_dn = mask_d[:, None] & mask_n[None, :]

    # the weights (A, dt_proj, dt bias, D) first: under PDL their loads overlap the previous kernel's tail
    A = tl.load(A_ptr + offs_d[:, None] * s_A_d + offs_n[None, :] * s_A_n, mask=mask_dn, other=0.0).to(tl.float32)
    if DT_LOW_RANK:
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        w = tl.load(dt_w_ptr + offs_d[:, None] * s_w_d + offs_r[None, :] * s_w_r,
                    mask=mask_d[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
    bias = load_or_zeros(dt_bias_ptr, offs_d, mask_d, HAS_DT_BIAS, BLOCK_D)
    Dv = load_or_zeros(D_ptr, offs_d, mask_d, HAS_D, BLOCK_D)
    pdl_wait(PDL)
    # every activation load is issued here, together: a load after the state store below could not be hoisted over
    # it (the compiler cannot rule out aliasing), so it would add a memory round trip to this latency-bound kernel
    state_ptrs = state_ptr + pid_b * s_st_b + offs_d[:, None] * s_st_d + offs_n[None, :] * s_st_n
    h = tl.load(state_ptrs, mask=mask_dn, other=0.0)
    x = tl.load(x_ptr + pid_b * s_x_b + offs_d * s_x_d, mask=mask_d, other=0.0).to(tl.float32)
    if DT_LOW_RANK:  # dt = dt_low @ W.T for this block's channels
        low = tl.load(dt_ptr + pid_b * s_dt_b + offs_r * s_dt_d, mask=mask_r, other=0.0).to(tl.float32)
    else:
        dt = tl.load(dt_ptr + pid_b * s_dt_b + offs_d * s_dt_d, mask=mask_d, other=0.0).to(tl.float32)
    B = tl.load(B_ptr + pid_b * s_B_b + offs_n * s_B_n, mask=mask_n, other=0.0).to(tl.float32)
    C = tl.load(C_ptr + pid_b * s_C_b + offs_n * s_C_n, mask=mask_n, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + pid_b * s_z_b + offs_d * s_z_d, mask=mask_d, other=0.0).to(tl.float32)
    if DT_LOW_RANK:
        dt = fsum(w * low[None, :], 1)
    dt += bias
    if DT_SOFTPLUS:
        dt = softplus(dt)

    h = tl.exp2(dt[:, None] * A * LOG2E) * h + (dt * x)[:, None] * B[None, :]
    tl.store(state_ptrs, h, mask=mask_dn)

    y = fsum(h * C[None, :], 1)
    if HAS_D:
        y += x * Dv
    if HAS_Z:
        y *= z * sigmoid(z)
    tl.store(y_ptr + pid_b * s_y_b + offs_d * s_y_d, y.to(y_ptr.dtype.element_ty), mask=mask_d)


# (BLOCK_D, warps) for batch 1 on a GPU (None: the rule below, which gives (16, 2) at the 2.8B shape). Measured inside
# whole 2.8B batch-1 decode steps on the H100 (the decode-tile sweep, removed after commit 14b6ead,
# results/archive/sweep_decode_ssu_tiles*_*.json): (8, 1) 0.787 ms against 0.797-0.799 ms for the rule's (16, 2): more
# programs (368) of one warp each.
BATCH1_TILE = (8, 1)


def launch_config(shapes, dtypes=None, interpret: bool = False, dt_rank: int = 0) -> dict:
    """shapes: (state (batch, dim, N), x (batch, dim), ...) in the reference's argument order; only state matters.
    dt_rank: R when dt arrives low-rank (fused dt projection), else 0."""
    batch, dim, d_state = shapes[0]
    block_n = next_pow2(d_state)
    if interpret:
        block_d = min(next_pow2(dim), 128)
    else:
        block_d = block_for_programs(dim, batch, choices=(64, 32, 16))
    warps = 4 if block_d * block_n >= 1024 else 2
    if BATCH1_TILE is not None and batch == 1 and not interpret:
        block_d, warps = BATCH1_TILE
    return {
        "kernel": "selective_state_update_kernel",
        "grid": (batch, triton.cdiv(dim, block_d)),
        "num_warps": warps,
        "num_stages": 1,
        "constexprs": {"BLOCK_D": block_d, "BLOCK_N": block_n, "BLOCK_R": next_pow2(max(dt_rank, 1)),
                       "DT_LOW_RANK": dt_rank > 0},
    }


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True,
                           *, dt_proj_weight=None, config: dict | None = None):
    """Same contract as selective_state_update_ref, except that `state` (batch, dim, N) fp32 is updated in place and
    returned: x, dt, z: (batch, dim); A: (dim, N); B, C: (batch, N); D, dt_bias: (dim,). Returns (y (batch, dim) in
    x.dtype, state). With dt_proj_weight (dim, R), dt is the low-rank (batch, R) input of the dt projection, which the
    kernel applies (== selective_state_update_ref(..., dt=dt @ dt_proj_weight.T, ...) with fp32 accumulation)."""
    batch, dim, d_state = state.shape
    if state.dtype != torch.float32:
        raise ValueError(f"selective_state_update: the state must be fp32, got {state.dtype}")
    rank = 0 if dt_proj_weight is None else dt_proj_weight.shape[1]
    dt_shape = (batch, dim) if dt_proj_weight is None else (batch, rank)
    if dt_proj_weight is not None and dt_proj_weight.shape[0] != dim:
        raise ValueError(f"selective_state_update: dt_proj_weight {tuple(dt_proj_weight.shape)} must be ({dim}, R)")
    if x.shape != (batch, dim) or dt.shape != dt_shape or A.shape != (dim, d_state):
        raise ValueError(f"selective_state_update: x {tuple(x.shape)}, dt {tuple(dt.shape)}, A {tuple(A.shape)} do not "
                         f"fit state {tuple(state.shape)}")
    if B.shape != (batch, d_state) or C.shape != (batch, d_state):
        raise ValueError(f"selective_state_update: B {tuple(B.shape)} / C {tuple(C.shape)} must be "
                         f"({batch}, {d_state})")
    y = torch.empty(batch, dim, dtype=x.dtype, device=x.device)
    kernel = kernel_for(selective_state_update_kernel, x)
    cfg = config or launch_config((state.shape,), interpret=is_interpreted(kernel), dt_rank=rank)
    zs = z.stride() if z is not None else (0, 0)
    w = dt_proj_weight
    kernel[cfg["grid"]](
        state, x, dt, A, B, C, D if D is not None else x, z if z is not None else x,
        dt_bias if dt_bias is not None else x, y, w if w is not None else x,
        dim, d_state, rank, *state.stride(), *x.stride(), *dt.stride(), *zs, *y.stride(), *B.stride(), *C.stride(),
        *A.stride(), *(w.stride() if w is not None else (0, 0)),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=bool(dt_softplus),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **cfg["constexprs"], **pdl_launch(x),
    )
    return y, state
