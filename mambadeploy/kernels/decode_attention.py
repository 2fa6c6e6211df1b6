"""Length-aware decode attention (flash-decoding, split-K) in Triton, beside its reference.

One query token per row attends to the first `lengths[b]` slots of a preallocated KV cache; the slots past it are never
read, so a step costs what the cache holds, not what it can hold. GQA is done inside the kernel: a program takes one
(row, KV head, split) and all `heads // kv_heads` query heads that share that KV head, so K and V are read once per
group and never `repeat_interleave`d.

- decode_attention_split_kernel: grid (batch, kv_heads, splits). Each split owns an equal share of the row's filled
  slots, rounded up to BLOCK_N and computed on the device from `lengths` (no host sync: the launch is the same for any
  fill, so it sits inside a CUDA graph). It keeps an online softmax (running max, sum, fp32 accumulator) and writes its
  partial output and log-sum-exp.
- decode_attention_combine_kernel: grid (batch, heads): weights the splits' partials by exp(lse - max lse).
KV may be fp32, fp16, bf16 or fp8 (e4m3): everything is widened to fp32 inside.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import dot_precision, dot_upcast, fmax, fsum, next_pow2
from .interpret import is_interpreted, kernel_for

# Splits per (row, KV head): enough programs to cover the GPU's SMs at batch 1 (Jamba: 8 KV heads x 32 = 256
# programs for 132 SMs), few enough that the combine stays small. Fewer when the batch already fills the GPU.
TARGET_PROGRAMS = 256
MAX_SPLITS = 64


def decode_attention_ref(q, key_cache, value_cache, lengths, scale=None):
    """q (B, H, hd); key_cache, value_cache (B, KV, S, hd); lengths (B,) int: valid slots per row (>= 1).
    Returns (B, H, hd) in q.dtype: softmax(q k^T * scale) v over slots [0, lengths[b]), fp32 math, GQA groups of
    H // KV consecutive query heads per KV head (as repeat_interleave)."""
    H, hd = q.shape[1], q.shape[2]
    kv, S = key_cache.shape[1], key_cache.shape[2]
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    k = key_cache.float().repeat_interleave(H // kv, dim=1)
    v = value_cache.float().repeat_interleave(H // kv, dim=1)
    scores = torch.einsum("bhd,bhsd->bhs", q.float(), k) * scale
    mask = torch.arange(S, device=q.device)[None, :] < lengths.to(q.device)[:, None]
    scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    return torch.einsum("bhs,bhsd->bhd", torch.softmax(scores, dim=-1), v).to(q.dtype)


@triton.jit
def decode_attention_split_kernel(
    q_ptr, k_ptr, v_ptr, len_ptr, part_ptr, lse_ptr,
    group, head_dim, n_splits, scale,
    s_q_b, s_q_h, s_k_b, s_k_h, s_k_s, s_v_b, s_v_h, s_v_s,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_kv = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_g = offs_g < group
    mask_d = offs_d < head_dim
    heads = pid_kv * group + offs_g  # the query heads of this KV head's group (rows past the group stay zero)

    length = tl.load(len_ptr + pid_b).to(tl.int32)
    per_split = ((length + n_splits - 1) // n_splits + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = pid_s * per_split
    stop = tl.minimum(start + per_split, length)

    q = tl.load(q_ptr + pid_b * s_q_b + heads[:, None] * s_q_h + offs_d[None, :],
                mask=mask_g[:, None] & mask_d[None, :], other=0.0).to(tl.float32) * scale
    # The two products run on tensor cores in the model's dtype (fp32 accumulate): q (G, hd) x K^T and p (G, N) x V.
    # A KV cache of another dtype (fp8) is widened to it tile by tile; UPCAST does both in fp32 (the interpreter).
    if UPCAST:
        q_mm = q
    else:
        q_mm = q.to(q_ptr.dtype.element_ty)
    k_row = k_ptr + pid_b * s_k_b + pid_kv * s_k_h
    v_row = v_ptr + pid_b * s_v_b + pid_kv * s_v_h
    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l = tl.full((BLOCK_G,), 0.0, tl.float32)
    acc = tl.full((BLOCK_G, BLOCK_D), 0.0, tl.float32)
    for s0 in range(start, stop, BLOCK_N):
        slots = s0 + offs_n
        mask_s = slots < stop
        kv_mask = mask_s[:, None] & mask_d[None, :]
        k = tl.load(k_row + slots[:, None] * s_k_s + offs_d[None, :], mask=kv_mask, other=0.0).to(q_mm.dtype)
        scores = tl.dot(q_mm, tl.trans(k), input_precision=PRECISION)  # (G, N) fp32
        scores = tl.where(mask_s[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, fmax(scores, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        v = tl.load(v_row + slots[:, None] * s_v_s + offs_d[None, :], mask=kv_mask, other=0.0).to(q_mm.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(q_mm.dtype), v, input_precision=PRECISION)
        l = l * alpha + fsum(p, 1)
        m = m_new
    # An empty split (short row) writes lse = -inf and a zero partial; the combine gives it weight 0.
    lse = tl.where(l > 0, m + tl.log(tl.where(l > 0, l, 1.0)), float("-inf"))
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    n_heads = tl.num_programs(1) * group
    row = (pid_b * n_heads + heads) * n_splits + pid_s  # partials laid out (B, H, splits, hd)
    tl.store(lse_ptr + row, lse, mask=mask_g)
    tl.store(part_ptr + row[:, None] * head_dim + offs_d[None, :], out, mask=mask_g[:, None] & mask_d[None, :])


@triton.jit
def decode_attention_combine_kernel(
    part_ptr, lse_ptr, out_ptr, head_dim, n_splits, s_o_b, s_o_h,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < n_splits
    mask_d = offs_d < head_dim
    row = (pid_b * tl.num_programs(1) + pid_h) * n_splits + offs_s
    lse = tl.load(lse_ptr + row, mask=mask_s, other=float("-inf"))
    weight = tl.exp(lse - fmax(lse, 0))  # the first split is never empty (lengths >= 1)
    part = tl.load(part_ptr + row[:, None] * head_dim + offs_d[None, :], mask=mask_s[:, None] & mask_d[None, :],
                   other=0.0)
    out = fsum(part * weight[:, None], 0) / fsum(weight, 0)
    tl.store(out_ptr + pid_b * s_o_b + pid_h * s_o_h + offs_d, out.to(out_ptr.dtype.element_ty), mask=mask_d)


def launch_config(shapes, dtypes=None, interpret: bool = False) -> dict:
    """shapes: (q (B, H, hd), key_cache (B, KV, S, hd)). The split count depends only on shapes, never on the fill."""
    (batch, heads, head_dim), (_, kv_heads, slots, _) = shapes[0], shapes[1]
    group = heads // kv_heads
    # The interpreter pays per op, not per element: few, wide blocks and at most two splits (still two, so the combine
    # and an empty split are exercised).
    block_n = 64
    splits = max(1, min(MAX_SPLITS, TARGET_PROGRAMS // max(batch * kv_heads, 1), triton.cdiv(slots, block_n)))
    if interpret:
        splits = min(splits, 2)
    return {
        "kernel": "decode_attention_split_kernel",
        "grid": (batch, kv_heads, splits),
        "combine_grid": (batch, heads),
        "splits": splits,
        "num_warps": 4,
        "num_stages": 3,
        # tl.dot needs >= 16 rows and columns: the group is padded to 16 query heads (the extra MMA work is free
        # beside the KV stream), head_dim to 16.
        "constexprs": {"BLOCK_G": max(16, next_pow2(group)), "BLOCK_N": block_n, "BLOCK_D": max(16, next_pow2(head_dim))},
    }


def decode_attention(q, key_cache, value_cache, lengths, scale=None, *, out=None, config: dict | None = None):
    """Same contract as decode_attention_ref. lengths: (B,) int tensor on q's device (read by the kernel, so the
    launch does not depend on its values). out: an optional (B, H, hd) tensor of q.dtype to write into."""
    Bsz, H, hd = q.shape
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape or key_cache.shape[0] != Bsz \
            or key_cache.shape[3] != hd or H % key_cache.shape[1]:
        raise ValueError(f"decode_attention: q {tuple(q.shape)} and caches {tuple(key_cache.shape)} / "
                         f"{tuple(value_cache.shape)} do not fit (B, H, hd) / (B, KV, S, hd) with KV dividing H")
    if lengths.shape != (Bsz,):
        raise ValueError(f"decode_attention: lengths must be ({Bsz},), got {tuple(lengths.shape)}")
    if key_cache.stride(3) != 1 or value_cache.stride(3) != 1 or q.stride(2) != 1:
        raise ValueError("decode_attention: head_dim must be the contiguous axis of q and the caches")
    kernel = kernel_for(decode_attention_split_kernel, q)
    cfg = config or launch_config((q.shape, key_cache.shape), interpret=is_interpreted(kernel))
    splits = cfg["splits"]
    part = torch.empty(Bsz, H, splits, hd, dtype=torch.float32, device=q.device)
    lse = torch.empty(Bsz, H, splits, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q) if out is None else out
    scale = 1.0 / math.sqrt(hd) if scale is None else float(scale)
    kernel[cfg["grid"]](
        q, key_cache, value_cache, lengths, part, lse,
        H // key_cache.shape[1], hd, splits, scale,
        q.stride(0), q.stride(1), *key_cache.stride()[:3], *value_cache.stride()[:3],
        UPCAST=dot_upcast(q.dtype, is_interpreted(kernel)), PRECISION=dot_precision(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 3), **cfg["constexprs"],
    )
    combine = kernel_for(decode_attention_combine_kernel, q)
    combine[cfg["combine_grid"]](part, lse, out, hd, splits, out.stride(0), out.stride(1),
                                 BLOCK_S=next_pow2(splits), BLOCK_D=next_pow2(hd), num_warps=1 if splits <= 32 else 4)
    return out


# --------------------------------------------------------------------------- the registry op DecodeAttention (opset.py)
def _step_scale(scale, head_dim):
    """The op's `scale` attribute: 0 (or None) means 1/sqrt(head_dim)."""
    return 1.0 / math.sqrt(head_dim) if not scale else float(scale)


def decode_attention_update_ref(q, k, v, key_cache, value_cache, pos, scale=0.0):
    """The registry op DecodeAttention, pure: q (B, H, hd); k, v (B, KV, hd); caches (B, KV, S, hd); pos (B,) int.
    Returns (out (B, H, hd) in q.dtype, present_key, present_value): the caches with k/v written at slot pos[b] (in the
    cache dtype), then decode_attention_ref over slots [0, pos[b]] — torch-fast's decode_step attention, fp32 math."""
    rows = torch.arange(q.shape[0], device=q.device)
    key_cache, value_cache = key_cache.clone(), value_cache.clone()
    key_cache[rows, :, pos] = k.to(key_cache.dtype)
    value_cache[rows, :, pos] = v.to(value_cache.dtype)
    out = decode_attention_ref(q, key_cache, value_cache, pos + 1, _step_scale(scale, q.shape[-1]))
    return out, key_cache, value_cache


def write_slot(cache, rows, pos, value):
    """cache[rows, :, pos] = value, in the cache's dtype. One-byte (fp8) caches are written through a uint8 view:
    index_put has no fp8 kernels everywhere, a byte copy needs none."""
    value = value.to(cache.dtype)
    if cache.element_size() == 1 and cache.dtype != torch.uint8:
        cache, value = cache.view(torch.uint8), value.view(torch.uint8)
    cache[rows, :, pos] = value


def decode_attention_update(q, k, v, key_cache, value_cache, pos, scale=0.0):
    """DecodeAttention through the Triton kernels, as torch-fast runs it: k/v written into the caches IN PLACE (the
    returned present_* ARE the caches: the op's outputs alias its inputs), then the split-K kernel over [0, pos[b]]."""
    rows = torch.arange(q.shape[0], device=q.device)
    write_slot(key_cache, rows, pos, k)
    write_slot(value_cache, rows, pos, v)
    out = decode_attention(q, key_cache, value_cache, pos + 1, _step_scale(scale, q.shape[-1]))
    return out, key_cache, value_cache
