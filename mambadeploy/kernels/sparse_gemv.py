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

from mambadeploy.models.ref_ops import activation_ref  # absolute: also loaded as the interpreted twin

from .common import TARGET_PROGRAMS, fmax, fsum
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


def sparse_expert_gemv_ref(x, wt, experts, mode: float, threshold: float, bias=None, *, activation=None,
                           scale=None):
    """x (P, K) one input row per (token, slot) pair; wt (E, K, N); experts (P,) int; bias (E, N) or None -> (P, N).
    activation (fc1 of a gated FFN, the compacting kernel's epilogue): N = 2F, returns act(gate) * up (P, F), each
    step rounded to x.dtype as the reference MoE computes it. scale (P,) (fc2 of a top-1 MoE): the rounded output
    times its routing weight, rounded again (the reference's fp32 combine of a single expert)."""
    xs = (x.float() - mode)
    xs = torch.where(xs.abs() > threshold, xs, torch.zeros((), dtype=xs.dtype, device=x.device)).to(x.dtype).float()
    y = torch.einsum("pk,pkn->pn", xs, wt[experts].float())
    if bias is not None:
        y = y + bias[experts].float()
    y = y.to(x.dtype)
    if activation is not None:
        gate, up = y.chunk(2, dim=-1)
        y = activation_ref(gate, activation) * up
    if scale is not None:
        y = (y.float() * scale.float()[:, None]).to(x.dtype)
    return y


@triton.jit
def sparse_gemv_kernel(x_ptr, wt_ptr, bias_ptr, y_ptr, expert_ptr, B, K, N, stride_x, stride_y, stride_we,
                       mode, threshold, k_per_split, HAS_BIAS: tl.constexpr, PER_ROW_EXPERT: tl.constexpr,
                       SPLIT_K: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (n block, row group, k split). Dense layers: one row group of all B rows sharing wt. Experts
    (PER_ROW_EXPERT): one row per program along axis 1, its expert from expert_ptr. SPLIT_K > 1: each split adds its
    partial sums into the fp32 y with atomics (the bias once, by split 0)."""
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
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
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_end
        xv = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        xc = xv.to(tl.float32) - mode
        keep = (tl.abs(xc) > threshold) & row_ok[:, None] & k_ok[None, :]
        xs = tl.where(keep, xc, 0.0).to(xv.dtype).to(tl.float32)
        row_needed = fmax(keep.to(tl.int32), 0) > 0  # (BLOCK_K,): some row of the batch keeps feature k
        w = tl.load(w_base + ks[:, None].to(tl.int64) * N + cols[None, :],
                    mask=row_needed[:, None] & col_ok[None, :], other=0.0)
        acc += fsum(xs[:, :, None] * w.to(tl.float32)[None, :, :], 1)
    if HAS_BIAS:  # noqa: SIM102 (HAS_BIAS is a compile-time branch, pid_k a runtime one)
        if pid_k == 0:
            acc += tl.load(b_base + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + rows[:, None] * stride_y + cols[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    else:
        tl.atomic_add(out, acc, mask=row_ok[:, None] & col_ok[None, :])


def launch_config(K: int, N: int, row_programs: int, interpreted: bool, split_k: int | None = None) -> dict:
    """Blocks and split-K (a pure function of shapes). A GEMV is bound by the bytes it reads, so the GPU needs enough
    programs in flight: split K until there are ~TARGET_PROGRAMS (out_proj of the 2.8B shape has 23 column blocks)."""
    block_k, block_n = (32, 32) if interpreted else (32, 128 if N >= 4096 else 64)
    programs = triton.cdiv(N, block_n) * row_programs
    if split_k is None:
        split_k = 1 if interpreted else max(1, min(triton.cdiv(TARGET_PROGRAMS, programs), K // (4 * block_k)))
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    split_k = triton.cdiv(K, k_per_split)
    return {"BLOCK_K": block_k, "BLOCK_N": block_n, "SPLIT_K": split_k, "k_per_split": k_per_split,
            "grid": (triton.cdiv(N, block_n), row_programs, split_k)}


def _launch(kernel, x, wt, bias, experts, rows, B, K, N, stride_we, mode, threshold, per_row_expert, split_k):
    cfg = launch_config(K, N, rows, is_interpreted(kernel), split_k)
    split = cfg["SPLIT_K"] > 1
    y = (torch.zeros if split else torch.empty)(B, N, dtype=torch.float32 if split else x.dtype, device=x.device)
    kernel[cfg["grid"]](x, wt, bias if bias is not None else y, y, experts if experts is not None else y, B, K, N,
                        x.stride(0), y.stride(0), stride_we, float(mode), float(threshold), cfg["k_per_split"],
                        HAS_BIAS=bias is not None, PER_ROW_EXPERT=per_row_expert, SPLIT_K=cfg["SPLIT_K"],
                        BLOCK_B=1 if per_row_expert else max(1, triton.next_power_of_2(B)),
                        BLOCK_K=cfg["BLOCK_K"], BLOCK_N=cfg["BLOCK_N"])
    return y.to(x.dtype) if split else y


def sparse_gemv(x: torch.Tensor, wt: torch.Tensor, mode: float, threshold: float, bias: torch.Tensor | None = None,
                *, split_k: int | None = None):
    """Same contract as sparse_gemv_ref. x (B, K) with B <= MAX_BATCH, contiguous rows; wt (K, N) contiguous.
    split_k: None = launch_config's choice."""
    if x.dim() != 2 or wt.dim() != 2 or x.shape[1] != wt.shape[0]:
        raise ValueError(f"sparse_gemv: x {tuple(x.shape)} and wt {tuple(wt.shape)} do not fit (x (B, K), wt (K, N))")
    if x.shape[0] > MAX_BATCH:
        raise ValueError(f"sparse_gemv: batch {x.shape[0]} > {MAX_BATCH}")
    B, K = x.shape
    N = wt.shape[1]
    x, wt = x.contiguous(), wt.contiguous()
    kernel = kernel_for(sparse_gemv_kernel, x)
    return _launch(kernel, x, wt, bias, None, 1, B, K, N, 0, mode, threshold, False, split_k)


def sparse_expert_gemv(x: torch.Tensor, wt: torch.Tensor, experts: torch.Tensor, mode: float, threshold: float,
                       bias: torch.Tensor | None = None, *, split_k: int | None = None):
    """Same contract as sparse_expert_gemv_ref: x (P, K), wt (E, K, N), experts (P,), bias (E, N) -> (P, N)."""
    if x.dim() != 2 or wt.dim() != 3 or x.shape[1] != wt.shape[1] or experts.shape != (x.shape[0],):
        raise ValueError(f"sparse_expert_gemv: x {tuple(x.shape)}, wt {tuple(wt.shape)}, experts "
                         f"{tuple(experts.shape)} do not fit (x (P, K), wt (E, K, N), experts (P,))")
    P, K = x.shape
    N = wt.shape[2]
    x, wt, experts = x.contiguous(), wt.contiguous(), experts.contiguous()
    kernel = kernel_for(sparse_gemv_kernel, x)
    return _launch(kernel, x, wt, None if bias is None else bias.contiguous(), experts, P, P, K, N, wt.stride(0),
                   mode, threshold, True, split_k)


# --------------------------------------------------------------------------- the registry op SparseLinear's signature
def sparse_linear_ref(x, weight, bias=None, mode: float = 0.0, threshold: float = 0.0):
    """opset SparseLinear's reference: x (*rows, K), weight (N, K) as nn.Linear stores it, bias (N,) or None ->
    (*rows, N) in x.dtype = F.linear(s(x), weight, bias) in fp32 math (sparse_gemv_ref on the transposed weight)."""
    return sparse_gemv_ref(x, weight.t(), mode, threshold, bias)


def sparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, mode: float = 0.0,
                  threshold: float = 0.0):
    """sparse_linear_ref's contract on sparse_gemv_kernel: rows in chunks of MAX_BATCH. It transposes the weight per
    call (a copy): the parity form of the op; torch-fast keeps pre-transposed weights and calls sparse_gemv itself."""
    K, N = weight.shape[1], weight.shape[0]
    rows = x.reshape(-1, K)
    wt = weight.t().contiguous()
    out = [sparse_gemv(rows[i:i + MAX_BATCH].contiguous(), wt, mode, threshold, bias)
           for i in range(0, rows.shape[0], MAX_BATCH)]
    return torch.cat(out).reshape(*x.shape[:-1], N)
