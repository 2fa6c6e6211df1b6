"""torch-fast's attention layers (Jamba): prefill chunks through F.scaled_dot_product_attention (flash / memory-efficient
kernels, GQA without repeat_interleave, no L x L fp32 score matrix), decode steps through the length-aware Triton kernel
(kernels/decode_attention.py). The KV cache is preallocated per sequence; row b's real tokens sit compacted at slots
[0, pos[b]), as the reference model keeps them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels.decode_attention import write_slot
from ..models import sparsity


@dataclass(frozen=True)
class ChunkRows:
    """Where one prefill chunk's tokens go, known on the host. `filled[b]`: slots row b held before the chunk;
    `real[b]`: its real (non-pad) tokens in the chunk, always the chunk's last ones (prompts are left-padded)."""
    filled: tuple
    real: tuple

    @property
    def uniform(self) -> bool:
        """Every row at the same fill with no pads in the chunk: one batched call, no per-row work."""
        return len(set(self.filled)) == 1 and len(set(self.real)) == 1


def chunk_rows(lengths: list[int] | None, batch: int, prompt_len: int, start: int, stop: int) -> ChunkRows:
    """The ChunkRows of chunk [start, stop) of a (batch, prompt_len) left-padded prompt with real `lengths`
    (None: no padding)."""
    lengths = lengths or [prompt_len] * batch
    pads = [prompt_len - n for n in lengths]
    filled = tuple(max(0, start - p) for p in pads)
    real = tuple(max(0, stop - max(start, p)) for p in pads)
    return ChunkRows(filled, real)


def _attend(q, k, v):
    """q (1|B, H, Lq, hd) against k, v (…, KV, Lk, hd) whose last Lq slots are the queries' own: causal aligned to the
    bottom right (query i sees every earlier slot and the chunk's keys up to its own)."""
    if k.dtype != q.dtype:  # an fp8 cache: widen the prefix this chunk reads (SDPA takes no fp8)
        k, v = k.to(q.dtype), v.to(q.dtype)
    Lq, Lk = q.shape[2], k.shape[2]
    if Lq == Lk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    from torch.nn.attention.bias import causal_lower_right

    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(Lq, Lk), enable_gqa=True)


def prefill_chunk(attn, x, key_cache, value_cache, rows: ChunkRows):
    """x (B, Lc, d) one chunk of left-padded prompts in the model dtype; the caches (B, KV, S, hd) are appended to in
    place. Returns the attention output (B, Lc, d); pad positions get zeros (nothing downstream reads them)."""
    Lc = x.shape[1]
    q = sparsity.linear(attn, "q_proj", x).unflatten(-1, (attn.n_heads, attn.head_dim)).transpose(1, 2)  # (B, H, Lc, hd)
    k = sparsity.linear(attn, "k_proj", x).unflatten(-1, (attn.n_kv, attn.head_dim)).transpose(1, 2)
    v = sparsity.linear(attn, "v_proj", x).unflatten(-1, (attn.n_kv, attn.head_dim)).transpose(1, 2)
    if rows.uniform and rows.real[0] == Lc:
        p = rows.filled[0]
        key_cache[:, :, p:p + Lc] = k.to(key_cache.dtype)
        value_cache[:, :, p:p + Lc] = v.to(value_cache.dtype)
        out = _attend(q, key_cache[:, :, :p + Lc], value_cache[:, :, :p + Lc])
    else:  # rows differ: one call per row over its own real queries and filled slots
        out = torch.zeros_like(q)
        for b, (p, n) in enumerate(zip(rows.filled, rows.real)):
            if n == 0:
                continue
            key_cache[b, :, p:p + n] = k[b, :, Lc - n:].to(key_cache.dtype)
            value_cache[b, :, p:p + n] = v[b, :, Lc - n:].to(value_cache.dtype)
            out[b:b + 1, :, Lc - n:] = _attend(q[b:b + 1, :, Lc - n:], key_cache[b:b + 1, :, :p + n],
                                               value_cache[b:b + 1, :, :p + n])
    return sparsity.linear(attn, "o_proj", out.transpose(1, 2).flatten(2))


def decode_step(attn, x, key_cache, value_cache, pos, kernel):
    """x (B, d): one token per row. Writes its K/V at slot pos[b] (in place), then attends over slots [0, pos[b]]
    with `kernel` (kernels/decode_attention.decode_attention): only the filled slots are read, and every shape is
    independent of pos, so the step stays one CUDA graph."""
    Bsz = x.shape[0]
    q = sparsity.linear(attn, "q_proj", x).unflatten(-1, (attn.n_heads, attn.head_dim))  # (B, H, hd)
    k = sparsity.linear(attn, "k_proj", x).unflatten(-1, (attn.n_kv, attn.head_dim))
    v = sparsity.linear(attn, "v_proj", x).unflatten(-1, (attn.n_kv, attn.head_dim))
    rows = torch.arange(Bsz, device=x.device)
    write_slot(key_cache, rows, pos, k)
    write_slot(value_cache, rows, pos, v)
    out = kernel(q, key_cache, value_cache, pos + 1)
    return sparsity.linear(attn, "o_proj", out.flatten(1))
