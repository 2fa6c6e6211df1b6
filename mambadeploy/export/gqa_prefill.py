"""The chunked-prefill graph's attention as com.microsoft.GroupQueryAttention (issue 21): `prefill_state.onnx` of a
`--ops contrib` or `--ops custom` export continues a sequence whose KV cache it is handed, so its attention is one
GQA node over that fixed-length cache — the chunk's K/V written at slots [pos, pos + L), each query i attending to
slots [0, pos + i] (GQA is causal), flash attention on CUDA, GQA inside the op — instead of the reference's fp32
(L x (max_len + L)) score matrix, which at a 256K cache does not fit in any GPU.

ONNX Runtime takes a prompt of L > 1 tokens beside a past cache at batch 1 only ("batch_size must be 1 when
sequence_length > 1 and past context is given"), and the op has no padding mask. So this graph is exported at batch 1
(a static dimension: ORT refuses any other batch by name), and the ORT runner's chunked prefill runs the rows of a
batch one after the other, each on its own real tokens (runtime/ort_chunked.py). Its KV outputs may share the
input's buffer (runtime/ort_exports.aliased_states): each chunk then writes its slots in place.
"""

from __future__ import annotations

import torch

from ..models import layers, sparsity
from ..models.config import ModelConfig
from .torch_ops import patched

GQA_PREFILL_OPS = ("contrib", "custom")  # the modes whose prefill_state attention is one GroupQueryAttention node


def uses_gqa_prefill(config: ModelConfig, ops: str) -> bool:
    """Whether prefill_state.onnx of this model and op mode attends through GroupQueryAttention (and so is batch 1)."""
    from .contrib import gqa_fits

    return ops in GQA_PREFILL_OPS and gqa_fits(config)


@torch.library.custom_op("mambadeploy::ort_gqa_prefill", mutates_args=())
def ort_gqa_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor,
                    value_cache: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, L, H * hd); k, v (B, L, KV * hd); caches (B, KV, max_len, hd); pos (B,) int64 = filled slots. Writes the
    chunk's K/V at slots [pos, pos + L), then query i attends to slots [0, pos + i]. Returns (out (B, L, H * hd),
    key_cache, value_cache): Attention._continue's math for rows without padding, fp32 softmax."""
    B, L = q.shape[:2]
    KV, S, hd = key_cache.shape[1:]
    H = q.shape[2] // hd
    slots = pos.to(torch.int64)[:, None] + torch.arange(L, device=q.device)  # (B, L)
    where = slots[:, None, :, None].expand(B, KV, L, hd)
    key_cache = key_cache.clone().scatter_(2, where, k.reshape(B, L, KV, hd).transpose(1, 2).to(key_cache.dtype))
    value_cache = value_cache.clone().scatter_(2, where, v.reshape(B, L, KV, hd).transpose(1, 2).to(value_cache.dtype))
    keys = key_cache.float().repeat_interleave(H // KV, dim=1)  # (B, H, S, hd)
    values = value_cache.float().repeat_interleave(H // KV, dim=1)
    queries = q.float().reshape(B, L, H, hd).transpose(1, 2)  # (B, H, L, hd)
    scores = torch.matmul(queries, keys.transpose(-1, -2)) / hd ** 0.5
    seen = torch.arange(S, device=q.device)[None, None, :] <= slots[:, :, None]  # (B, L, S)
    probs = torch.softmax(scores.masked_fill(~seen[:, None], float("-inf")), dim=-1)
    out = torch.matmul(probs, values).transpose(1, 2).reshape(B, L, H * hd)
    return out.to(q.dtype), key_cache, value_cache


@ort_gqa_prefill.register_fake
def _ort_gqa_prefill_fake(q, k, v, key_cache, value_cache, pos):
    return torch.empty_like(q), torch.empty_like(key_cache), torch.empty_like(value_cache)


def _continue_via_gqa(self, x, valid, key_cache, value_cache, pos):
    """layers.Attention._continue through one ort_gqa_prefill node (rows without padding: batch-1 chunks)."""
    q = sparsity.linear(self, "q_proj", x)
    k = sparsity.linear(self, "k_proj", x).to(key_cache.dtype)
    v = sparsity.linear(self, "v_proj", x).to(value_cache.dtype)
    out, key_cache, value_cache = torch.ops.mambadeploy.ort_gqa_prefill(q, k, v, key_cache, value_cache, pos)
    n = valid.sum(-1) if valid is not None else torch.full_like(pos, x.shape[1])
    return sparsity.linear(self, "o_proj", out), key_cache, value_cache, pos + n


def gqa_prefill_patches():
    """For tracing prefill_state: each attention layer's continuation becomes one ort_gqa_prefill node."""
    return patched(layers.Attention, _continue=_continue_via_gqa)


def emit_gqa_prefill(q, k, v, key_cache, value_cache, pos):
    """ort_gqa_prefill as com.microsoft.GroupQueryAttention over the fixed-length cache: seqlens_k = pos + L - 1 (the
    last slot each row attends), total_sequence_length = max(pos) + L."""
    from onnxscript import opset18 as op

    from .contrib import _ms

    kv_heads, hd = key_cache.shape[1], key_cache.shape[3]
    length = op.Shape(q, start=1, end=2)  # (1,) int64: L
    filled = op.Add(pos, length)
    seqlens = op.Cast(op.Sub(filled, op.Constant(value_int=1)), to=6)
    total = op.Cast(op.ReduceMax(filled, keepdims=0), to=6)
    out, key_cache, value_cache = _ms().GroupQueryAttention(
        q, k, v, key_cache, value_cache, seqlens, total, num_heads=int(q.shape[2]) // int(hd),
        kv_num_heads=int(kv_heads), _outputs=3)
    return out, key_cache, value_cache


def translation_table() -> dict:
    return {torch.ops.mambadeploy.ort_gqa_prefill.default: emit_gqa_prefill}
