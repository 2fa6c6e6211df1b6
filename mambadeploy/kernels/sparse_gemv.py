"""SCAP sparse GEMV for decode (batch 1-4): y = s(x) · Wᵀ + b with s(x) = (x − m)·[|x − m| > t], fused.

The weight is stored transposed, wt (K, N): input feature k owns the contiguous row wt[k, :], so an activation that the
threshold drops skips a whole contiguous row — the bytes a decode step reads fall with the sparsity. A row is read when
*any* row of the batch keeps feature k (the batch shares the weight read), so batch 4 saves less than batch 1.
Standard-library helpers (tl.sum, tl.max) are avoided for the interpreter twin (see common.py).
Loads of dropped rows are predicated off (masked), which keeps the kernel free of data-dependent shapes (one launch,
CUDA-graph friendly) — no compaction pass.

`sparse_expert_gemv` is the MoE variant: one (token, slot) pair per program row, each with its own expert's weight
wt (E, K, N) and its own input row (fc1: the token's input, fc2: that expert's hidden).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import fmax, fsum
from .interpret import is_interpreted, kernel_for

MAX_BATCH = 4  # decode batches this kernel is for; larger batches keep few rows skippable (use the dense GEMM)


def sparse_gemv_ref(x, wt, mode: float, threshold: float, bias=None):
    """x (B, K); wt (K, N) transposed weight; bias (N,) or None -> (B, N) in x.dtype. fp32 math; the sparsified input
    is rounded to x.dtype first, as the reference model's F.linear(sparsify_ref(x), W, b') sees it."""
    xs = (x.float() - mode)
    xs = torch.where(xs.abs() > threshold, xs, torch.zeros((), dtype=xs.dtype, device=x.device)).to(x.dtype).float()
    y = xs @ wt.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def sparse_expert_gemv_ref(x, wt, experts, mode: float, threshold: float, bias=None):
    """x (P, K) one input row per (token, slot) pair; wt (E, K, N); experts (P,) int; bias (E, N) or None -> (P, N)."""
    xs = (x.float() - mode)
    xs = torch.where(xs.abs() > threshold, xs, torch.zeros((), dtype=xs.dtype, device=x.device)).to(x.dtype).float()
    y = torch.einsum("pk,pkn->pn", xs, wt[experts].float())
    if bias is not None:
        y = y + bias[experts].float()
    return y.to(x.dtype)


@triton.jit
def sparse_gemv_kernel(x_ptr, wt_ptr, bias_ptr, y_ptr, expert_ptr, B, K, N, stride_x, stride_y, stride_we,
                       mode, threshold, HAS_BIAS: tl.constexpr, PER_ROW_EXPERT: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (n block, row group). Dense layers: one row group of all B rows sharing wt. Experts
    (PER_ROW_EXPERT): one row per program along axis 1, its expert from expert_ptr."""
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    rows = pid_r * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w_base = wt_ptr
    b_base = bias_ptr
    if PER_ROW_EXPERT:
        e = tl.load(expert_ptr + pid_r).to(tl.int64)
        w_base = wt_ptr + e * stride_we
        b_base = bias_ptr + e * N
    acc = tl.full((BLOCK_B, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        xv = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        xc = xv.to(tl.float32) - mode
        keep = (tl.abs(xc) > threshold) & row_ok[:, None] & k_ok[None, :]
        xs = tl.where(keep, xc, 0.0).to(xv.dtype).to(tl.float32)
        row_needed = fmax(keep.to(tl.int32), 0) > 0  # (BLOCK_K,): some row of the batch keeps feature k
        w = tl.load(w_base + ks[:, None].to(tl.int64) * N + cols[None, :],
                    mask=row_needed[:, None] & col_ok[None, :], other=0.0)
        acc += fsum(xs[:, :, None] * w.to(tl.float32)[None, :, :], 1)
    if HAS_BIAS:
        acc += tl.load(b_base + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _blocks(interpreted: bool, n: int) -> tuple[int, int]:
    if interpreted:  # few, small programs: the interpreter runs each program in Python
        return 32, 32
    return 32, 128 if n >= 4096 else 64


def sparse_gemv(x: torch.Tensor, wt: torch.Tensor, mode: float, threshold: float, bias: torch.Tensor | None = None):
    """Same contract as sparse_gemv_ref. x (B, K) with B <= MAX_BATCH, contiguous rows; wt (K, N) contiguous."""
    if x.dim() != 2 or wt.dim() != 2 or x.shape[1] != wt.shape[0]:
        raise ValueError(f"sparse_gemv: x {tuple(x.shape)} and wt {tuple(wt.shape)} do not fit (x (B, K), wt (K, N))")
    if x.shape[0] > MAX_BATCH:
        raise ValueError(f"sparse_gemv: batch {x.shape[0]} > {MAX_BATCH}")
    B, K = x.shape
    N = wt.shape[1]
    x, wt = x.contiguous(), wt.contiguous()
    y = torch.empty(B, N, dtype=x.dtype, device=x.device)
    kernel = kernel_for(sparse_gemv_kernel, x)
    block_k, block_n = _blocks(is_interpreted(kernel), N)
    grid = (triton.cdiv(N, block_n), 1)
    kernel[grid](x, wt, bias if bias is not None else y, y, y, B, K, N, x.stride(0), y.stride(0), 0,
                 float(mode), float(threshold), HAS_BIAS=bias is not None, PER_ROW_EXPERT=False,
                 BLOCK_B=max(1, triton.next_power_of_2(B)), BLOCK_K=block_k, BLOCK_N=block_n)
    return y


def sparse_expert_gemv(x: torch.Tensor, wt: torch.Tensor, experts: torch.Tensor, mode: float, threshold: float,
                       bias: torch.Tensor | None = None):
    """Same contract as sparse_expert_gemv_ref: x (P, K), wt (E, K, N), experts (P,), bias (E, N) -> (P, N)."""
    if x.dim() != 2 or wt.dim() != 3 or x.shape[1] != wt.shape[1] or experts.shape != (x.shape[0],):
        raise ValueError(f"sparse_expert_gemv: x {tuple(x.shape)}, wt {tuple(wt.shape)}, experts "
                         f"{tuple(experts.shape)} do not fit (x (P, K), wt (E, K, N), experts (P,))")
    P, K = x.shape
    N = wt.shape[2]
    x, wt, experts = x.contiguous(), wt.contiguous(), experts.contiguous()
    y = torch.empty(P, N, dtype=x.dtype, device=x.device)
    kernel = kernel_for(sparse_gemv_kernel, x)
    block_k, block_n = _blocks(is_interpreted(kernel), N)
    grid = (triton.cdiv(N, block_n), P)
    kernel[grid](x, wt, bias.contiguous() if bias is not None else y, y, experts, P, K, N, x.stride(0),
                 y.stride(0), wt.stride(0), float(mode), float(threshold), HAS_BIAS=bias is not None,
                 PER_ROW_EXPERT=True, BLOCK_B=1, BLOCK_K=block_k, BLOCK_N=block_n)
    return y
