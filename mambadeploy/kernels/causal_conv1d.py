"""Causal depthwise conv1d over time (prefill) and its one-step update (decode), in Triton, beside the references.

State convention (ref_ops): (batch, dim, K) fp32 = the last K inputs, newest last; a sequence uses its last K-1 columns
as left context.
- causal_conv1d: grid (batch, channel blocks, time blocks); out[t] = bias + sum_k w[k] * x[t + k - (K-1)], where indices
  before the sequence read the initial state; fused SiLU; the programs of the first time block also write the final
  state (the last K inputs). The final state must not alias the initial state.
- causal_conv1d_update: grid (batch, channel blocks); shifts the state left by one IN PLACE, appends x, returns the
  dot with the weights (+ bias, SiLU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mambadeploy.models.ref_ops import causal_conv1d_ref, causal_conv1d_update_ref  # noqa: F401  (references)

from .common import block_for_programs, fsum, next_pow2, pdl_launch, pdl_wait, sigmoid
from .interpret import is_interpreted, kernel_for


@triton.jit
def causal_conv1d_kernel(
    x_ptr, w_ptr, bias_ptr, init_ptr, y_ptr, final_ptr,
    dim, seqlen,
    s_x_b, s_x_d, s_x_l, s_y_b, s_y_d, s_y_l, s_w_d, s_w_k,
    s_i_b, s_i_d, s_i_k, s_f_b, s_f_d, s_f_k,
    K: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    pid_l = tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_d = offs_d < dim
    mask_l = offs_l < seqlen
    x_rows = x_ptr + pid_b * s_x_b + offs_d[:, None] * s_x_d
    init_rows = init_ptr + pid_b * s_i_b + offs_d[:, None] * s_i_d

    acc = tl.full((BLOCK_D, BLOCK_L), 0.0, tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    for k in tl.static_range(K):
        src = offs_l + (k - (K - 1))  # input time index; < 0 reads the initial state's column K + src
        m = mask_d[:, None] & ((src >= 0) & mask_l)[None, :]
        xv = tl.load(x_rows + src[None, :] * s_x_l, mask=m, other=0.0).to(tl.float32)
        if HAS_INIT:
            m0 = mask_d[:, None] & ((src < 0) & mask_l)[None, :]
            xv += tl.load(init_rows + (src + K)[None, :] * s_i_k, mask=m0, other=0.0)
        wk = tl.load(w_ptr + offs_d * s_w_d + k * s_w_k, mask=mask_d, other=0.0).to(tl.float32)
        acc += wk[:, None] * xv
    if SILU:
        acc = acc * sigmoid(acc)
    tl.store(y_ptr + pid_b * s_y_b + offs_d[:, None] * s_y_d + offs_l[None, :] * s_y_l,
             acc.to(y_ptr.dtype.element_ty), mask=mask_d[:, None] & mask_l[None, :])

    if pid_l == 0:  # final state: column j holds input time seqlen - K + j (from the initial state when negative)
        # (own names: Triton refuses a variable that the if-block redefines with another shape than the loop's)
        offs_k = tl.arange(0, BLOCK_K)
        src_k = seqlen - K + offs_k
        m_k = mask_d[:, None] & ((src_k >= 0) & (offs_k < K))[None, :]
        fin = tl.load(x_rows + src_k[None, :] * s_x_l, mask=m_k, other=0.0).to(tl.float32)
        if HAS_INIT:
            m0_k = mask_d[:, None] & ((src_k < 0) & (offs_k < K))[None, :]
            fin += tl.load(init_rows + (src_k + K)[None, :] * s_i_k, mask=m0_k, other=0.0)
        tl.store(final_ptr + pid_b * s_f_b + offs_d[:, None] * s_f_d + offs_k[None, :] * s_f_k, fin,
                 mask=mask_d[:, None] & (offs_k < K)[None, :])


@triton.jit
def causal_conv1d_update_kernel(
    x_ptr, state_ptr, w_ptr, bias_ptr, y_ptr,
    dim,
    s_x_b, s_x_d, s_s_b, s_s_d, s_s_k, s_w_d, s_w_k, s_y_b, s_y_d,
    K: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    mask_d = offs_d < dim
    pdl_wait(PDL)
    rows = state_ptr + pid_b * s_s_b + offs_d[:, None] * s_s_d
    shifted = tl.load(rows + (offs_k + 1)[None, :] * s_s_k, mask=mask_d[:, None] & (offs_k < K - 1)[None, :], other=0.0)
    x = tl.load(x_ptr + pid_b * s_x_b + offs_d * s_x_d, mask=mask_d, other=0.0).to(tl.float32)
    new = tl.where((offs_k == K - 1)[None, :], x[:, None], shifted)
    tl.debug_barrier()  # every thread has read its old columns before any thread overwrites them
    tl.store(rows + offs_k[None, :] * s_s_k, new, mask=mask_d[:, None] & (offs_k < K)[None, :])

    w = tl.load(w_ptr + offs_d[:, None] * s_w_d + offs_k[None, :] * s_w_k, mask=mask_d[:, None] & (offs_k < K)[None, :],
                other=0.0).to(tl.float32)
    y = fsum(new * w, 1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if SILU:
        y = y * sigmoid(y)
    tl.store(y_ptr + pid_b * s_y_b + offs_d * s_y_d, y.to(y_ptr.dtype.element_ty), mask=mask_d)


def _check_activation(activation):
    if activation not in (None, "silu"):
        raise ValueError(f"unsupported activation {activation!r} (None or 'silu')")
    return activation == "silu"


def launch_config(shapes, dtypes=None, interpret: bool = False) -> dict:
    """shapes: (x (batch, dim, L), weight (dim, K), ...) in the CausalConv1d op order."""
    batch, dim, seqlen = shapes[0]
    K = shapes[1][1]
    if interpret:
        block_d, block_l = min(next_pow2(dim), 128), min(next_pow2(seqlen), 256)
    else:
        block_d, block_l = 64, 32
    return {
        "kernel": "causal_conv1d_kernel",
        "grid": (batch, triton.cdiv(dim, block_d), triton.cdiv(seqlen, block_l)),
        "num_warps": 4,
        "num_stages": 1,
        "constexprs": {"K": K, "BLOCK_K": next_pow2(K), "BLOCK_D": block_d, "BLOCK_L": block_l},
    }


def update_launch_config(shapes, dtypes=None, interpret: bool = False) -> dict:
    """shapes: (x (batch, dim), conv_state (batch, dim, K), weight (dim, K), ...)."""
    batch, dim = shapes[0]
    K = shapes[1][2]
    block_d = min(next_pow2(dim), 256) if interpret else block_for_programs(dim, batch, choices=(256, 128, 64))
    return {
        "kernel": "causal_conv1d_update_kernel",
        "grid": (batch, triton.cdiv(dim, block_d)),
        "num_warps": 4 if block_d >= 128 else 2,
        "num_stages": 1,
        "constexprs": {"K": K, "BLOCK_K": next_pow2(K), "BLOCK_D": block_d},
    }


def causal_conv1d(x, weight, bias=None, initial_state=None, activation=None, *, out=None,
                  config: dict | None = None):
    """Same contract as causal_conv1d_ref: x (batch, dim, L) in any layout; weight (dim, K); bias (dim,);
    initial_state (batch, dim, K) or None. Returns (out (batch, dim, L) in x.dtype and x's layout,
    final_state (batch, dim, K) fp32). out: a (batch, dim, L) tensor of x.dtype in any layout to write into (the
    torch-fast runner reads token-major x and writes channel-major out for the scan)."""
    batch, dim, seqlen = x.shape
    K = weight.shape[1]
    if weight.shape[0] != dim or (initial_state is not None and initial_state.shape != (batch, dim, K)):
        raise ValueError(f"causal_conv1d: weight {tuple(weight.shape)} / initial_state do not fit x {tuple(x.shape)}")
    silu = _check_activation(activation)
    if out is not None:
        if out.shape != x.shape or out.dtype != x.dtype:
            raise ValueError(f"causal_conv1d: out must be {x.dtype} {tuple(x.shape)}, "
                             f"got {out.dtype} {tuple(out.shape)}")
        y = out
    elif x.stride(1) == 1 and seqlen > 1:  # token-major in, token-major out
        y = torch.empty(batch, seqlen, dim, dtype=x.dtype, device=x.device).transpose(1, 2)
    else:
        y = torch.empty(batch, dim, seqlen, dtype=x.dtype, device=x.device)
    final = torch.empty(batch, dim, K, dtype=torch.float32, device=x.device)
    if seqlen == 0:
        final.copy_(initial_state if initial_state is not None else torch.zeros_like(final))
        return y, final
    kernel = kernel_for(causal_conv1d_kernel, x)
    cfg = config or launch_config((x.shape, weight.shape), interpret=is_interpreted(kernel))
    init = initial_state
    kernel[cfg["grid"]](
        x, weight, bias if bias is not None else weight, init if init is not None else final, y, final,
        dim, seqlen, *x.stride(), *y.stride(), *weight.stride(),
        *(init.stride() if init is not None else (0, 0, 0)), *final.stride(),
        HAS_BIAS=bias is not None, HAS_INIT=init is not None, SILU=silu,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **cfg["constexprs"],
    )
    return y, final


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, *, config: dict | None = None):
    """Same contract as causal_conv1d_update_ref, except that conv_state (batch, dim, K) fp32 is updated in place and
    returned. x: (batch, dim). Returns (out (batch, dim) in x.dtype, conv_state)."""
    batch, dim = x.shape
    K = weight.shape[1]
    if conv_state.shape != (batch, dim, K) or conv_state.dtype != torch.float32:
        raise ValueError(f"causal_conv1d_update: conv_state must be fp32 ({batch}, {dim}, {K}), got "
                         f"{conv_state.dtype} {tuple(conv_state.shape)}")
    silu = _check_activation(activation)
    y = torch.empty(batch, dim, dtype=x.dtype, device=x.device)
    kernel = kernel_for(causal_conv1d_update_kernel, x)
    cfg = config or update_launch_config((x.shape, conv_state.shape), interpret=is_interpreted(kernel))
    kernel[cfg["grid"]](
        x, conv_state, weight, bias if bias is not None else weight, y,
        dim, *x.stride(), *conv_state.stride(), *weight.stride(), *y.stride(),
        HAS_BIAS=bias is not None, SILU=silu,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **cfg["constexprs"], **pdl_launch(x),
    )
    return y, conv_state
