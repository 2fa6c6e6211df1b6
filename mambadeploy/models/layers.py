"""Reference layers. Plain PyTorch built on ref_ops, written so the same code traces for ONNX export:
no data-dependent shapes, no Python loops over chosen experts, states passed in and out as plain tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ref_ops, sparsity
from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x, pending=None):
        """RMSNorm of x; with `pending` (a sub-layer's output not yet added), x + pending in fp32 first, as one
        add_rms_norm_ref call (one fused node in the exports): returns (normed, the new residual x + pending)."""
        if pending is None:
            return ref_ops.rms_norm_ref(x, self.weight, self.eps)
        return ref_ops.add_rms_norm_ref(pending, x, self.weight, self.eps)


class LayerNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.eps = eps

    def forward(self, x):
        return ref_ops.layer_norm_ref(x, self.weight, self.bias, self.eps)


# --------------------------------------------------------------------------- Mamba-1 mixer
class MambaMixer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        m = config.mamba
        d, di, n, r = config.d_model, m.d_inner, m.d_state, m.dt_rank
        self.d_inner, self.d_state, self.d_conv, self.dt_rank = di, n, m.d_conv, r
        self.in_proj = nn.Linear(d, 2 * di, bias=m.proj_bias)
        self.conv1d = nn.Conv1d(di, di, m.d_conv, groups=di, bias=m.conv_bias)
        self.x_proj = nn.Linear(di, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, di, bias=True)
        self.A_log = nn.Parameter(torch.zeros(di, n))
        self.D = nn.Parameter(torch.ones(di))
        self.out_proj = nn.Linear(di, d, bias=m.proj_bias)
        if m.bcdt_norm:  # Jamba
            self.dt_norm = RMSNorm(r, config.norm_eps)
            self.B_norm = RMSNorm(n, config.norm_eps)
            self.C_norm = RMSNorm(n, config.norm_eps)
        else:
            self.dt_norm = self.B_norm = self.C_norm = None
        self.sparse = None  # SCAP sparsifiers by linear name (sparsity.attach), None for a dense model

    @property
    def conv_weight(self):
        return self.conv1d.weight.squeeze(1)  # (d_inner, d_conv)

    def A(self):
        return -torch.exp(self.A_log.float())

    def _ssm_params(self, xc):
        """xc: (..., d_inner) conv output -> dt (..., d_inner) without bias, B, C (..., N)."""
        dt, B, C = torch.split(sparsity.linear(self, "x_proj", xc), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.dt_norm is not None:
            dt, B, C = self.dt_norm(dt), self.B_norm(B), self.C_norm(C)
        return F.linear(dt, self.dt_proj.weight), B, C

    def forward(self, x, valid=None, conv_state=None, ssm_state=None):
        """x: (B, L, d); valid: (B, L) bool or None. Pad positions (valid False) leave the states untouched.
        conv_state / ssm_state: the states to continue from (None: zeros, a fresh sequence).
        Returns (out (B, L, d), conv_state (B, d_inner, d_conv) fp32, ssm_state (B, d_inner, N) fp32)."""
        xz = sparsity.linear(self, "in_proj", x)
        xs, z = xz.chunk(2, dim=-1)
        xs = xs.transpose(1, 2)  # (B, d_inner, L)
        if valid is not None:
            xs = torch.where(valid[:, None, :], xs, torch.zeros_like(xs))
        xc, conv_state = ref_ops.causal_conv1d_ref(xs, self.conv_weight, self.conv1d.bias, conv_state,
                                                   activation="silu")
        dt, B, C = self._ssm_params(xc.transpose(1, 2))
        dt = dt.transpose(1, 2)
        if valid is not None:
            # softplus(-inf) = 0 exactly: a zero time step keeps h (exp(0*A) = 1) and adds nothing.
            dt = torch.where(valid[:, None, :], dt, torch.full_like(dt, float("-inf")))
        y, ssm_state = ref_ops.selective_scan_ref(
            xc, dt, self.A(), B.transpose(1, 2), C.transpose(1, 2), self.D, z.transpose(1, 2),
            delta_bias=self.dt_proj.bias, delta_softplus=True, initial_state=ssm_state,
        )
        return sparsity.linear(self, "out_proj", y.transpose(1, 2)), conv_state, ssm_state

    def step(self, x, conv_state, ssm_state):
        """x: (B, d). Returns (out (B, d), conv_state, ssm_state)."""
        xs, z = sparsity.linear(self, "in_proj", x).chunk(2, dim=-1)
        xc, conv_state = ref_ops.causal_conv1d_update_ref(xs, conv_state, self.conv_weight, self.conv1d.bias, "silu")
        dt, B, C = self._ssm_params(xc)
        y, ssm_state = ref_ops.selective_state_update_ref(
            ssm_state, xc, dt, self.A(), B, C, self.D, z, dt_bias=self.dt_proj.bias, dt_softplus=True
        )
        return sparsity.linear(self, "out_proj", y), conv_state, ssm_state


# --------------------------------------------------------------------------- attention (Jamba: GQA, no positions)
# The reference's fp32 score blocks stay under this many elements (1 GiB): a 128K-token prompt would otherwise need a
# 128K x 128K matrix per head. The fast paths never build one (runtime/fast_attention.py).
REFERENCE_SCORE_ELEMENTS = 1 << 28

class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        a = config.attention
        self.n_heads, self.n_kv, self.head_dim, self.max_len = a.n_heads, a.n_kv_heads, a.head_dim, config.max_seq_len
        d = config.d_model
        self.q_proj = nn.Linear(d, a.n_heads * a.head_dim, bias=False)
        self.k_proj = nn.Linear(d, a.n_kv_heads * a.head_dim, bias=False)
        self.v_proj = nn.Linear(d, a.n_kv_heads * a.head_dim, bias=False)
        self.o_proj = nn.Linear(a.n_heads * a.head_dim, d, bias=False)
        self.sparse = None

    def _heads(self, t, n):
        return t.unflatten(-1, (n, self.head_dim)).transpose(1, 2)  # (B, n, L, hd)

    def _attend(self, q, k, v, mask):
        """q (B, H, Lq, hd); k, v (B, KV, Lk, hd); mask (B, 1, Lq, Lk) bool. fp32 softmax.
        Eager long prompts run in blocks of queries (the same numbers per row), so the fp32 scores stay under
        REFERENCE_SCORE_ELEMENTS; a traced graph (export) keeps the one-block form."""
        rows = max(1, REFERENCE_SCORE_ELEMENTS // (q.shape[0] * self.n_heads * k.shape[2]))
        if q.shape[2] > rows and not torch.compiler.is_compiling() and not torch.jit.is_tracing():
            return torch.cat([self._attend(q[:, :, i:i + rows], k, v, mask[:, :, i:i + rows])
                              for i in range(0, q.shape[2], rows)], dim=2)
        rep = self.n_heads // self.n_kv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return torch.matmul(probs, v.float()).to(q.dtype)

    def forward(self, x, valid=None, key_cache=None, value_cache=None, pos=None):
        """x: (B, L, d), left-padded rows (valid (B, L)). Returns (out, key_cache, value_cache, lengths).
        The caches hold each row's real tokens compacted to slots [0, len), zeros after. With key_cache / value_cache
        (B, KV, max_len, hd) and pos (B,) given, the prompt continues a sequence: its real tokens are appended at slots
        [pos, pos + len) and attend to the cached ones; lengths is then pos + len."""
        if key_cache is not None:
            return self._continue(x, valid, key_cache, value_cache, pos)
        Bsz, L, _ = x.shape
        q = self._heads(sparsity.linear(self, "q_proj", x), self.n_heads)
        k = self._heads(sparsity.linear(self, "k_proj", x), self.n_kv)
        v = self._heads(sparsity.linear(self, "v_proj", x), self.n_kv)
        ar = torch.arange(L, device=x.device)
        causal = ar[None, :] <= ar[:, None]  # (Lq, Lk)
        if valid is None:
            valid = torch.ones(Bsz, L, dtype=torch.bool, device=x.device)
        # A pad query may see itself so no softmax row is all -inf (its output is ignored).
        mask = causal[None] & (valid[:, None, :] | torch.eye(L, dtype=torch.bool, device=x.device)[None])
        out = self._attend(q, k, v, mask[:, None])
        out = sparsity.linear(self, "o_proj", out.transpose(1, 2).flatten(2))
        lengths = valid.sum(-1)
        # The whole (max_len) cache in one gather: slot s <- position s + pad for s < len, zeros after. No Pad op:
        # ONNX Runtime has no bf16 Pad kernel.
        slots = torch.arange(self.max_len, device=x.device)
        src = (slots[None, :] + (L - lengths)[:, None]).clamp(max=L - 1)
        keep = (slots[None, :] < lengths[:, None])[:, None, :, None]
        idx = src[:, None, :, None].expand(-1, self.n_kv, -1, self.head_dim)
        kc = torch.where(keep, k.gather(2, idx), torch.zeros((), dtype=k.dtype, device=x.device))
        vc = torch.where(keep, v.gather(2, idx), torch.zeros((), dtype=v.dtype, device=x.device))
        return out, kc, vc, lengths

    def _continue(self, x, valid, key_cache, value_cache, pos):
        Bsz, L, _ = x.shape
        q = self._heads(sparsity.linear(self, "q_proj", x), self.n_heads)
        k = self._heads(sparsity.linear(self, "k_proj", x), self.n_kv).to(key_cache.dtype)
        v = self._heads(sparsity.linear(self, "v_proj", x), self.n_kv).to(value_cache.dtype)
        if valid is None:
            valid = torch.ones(Bsz, L, dtype=torch.bool, device=x.device)
        ar = torch.arange(L, device=x.device)
        slots = torch.arange(self.max_len, device=x.device)
        # keys = [the cache's max_len slots, this prompt's L tokens]: cached slots below pos, then causal real tokens
        # (a pad query may see itself so no softmax row is all -inf; its output is ignored)
        cached = (slots[None, :] < pos[:, None])[:, None, :].expand(-1, L, -1)
        new = (ar[None, :] <= ar[:, None])[None] & (valid[:, None, :] | torch.eye(L, dtype=torch.bool,
                                                                                   device=x.device)[None])
        mask = torch.cat([cached, new], dim=-1)[:, None]
        out = self._attend(q, torch.cat([key_cache, k], dim=2), torch.cat([value_cache, v], dim=2), mask)
        out = sparsity.linear(self, "o_proj", out.transpose(1, 2).flatten(2))
        n = valid.sum(-1)
        # slot s <- this prompt's token s - pos + pad for pos <= s < pos + n; every other slot keeps the cache's value
        src = (slots[None, :] - pos[:, None] + (L - n)[:, None]).clamp(0, L - 1)
        take = ((slots[None, :] >= pos[:, None]) & (slots[None, :] < (pos + n)[:, None]))[:, None, :, None]
        idx = src[:, None, :, None].expand(-1, self.n_kv, -1, self.head_dim)
        kc = torch.where(take, k.gather(2, idx), key_cache)
        vc = torch.where(take, v.gather(2, idx), value_cache)
        return out, kc, vc, pos + n

    def step(self, x, key_cache, value_cache, pos):
        """x: (B, d); caches (B, KV, max_len, hd); pos (B,) int64 = valid slots. Writes slot pos, attends to <= pos."""
        q = sparsity.linear(self, "q_proj", x).unflatten(-1, (self.n_heads, self.head_dim)).unsqueeze(2)  # (B, H, 1, hd)
        k = sparsity.linear(self, "k_proj", x).unflatten(-1, (self.n_kv, self.head_dim)).unsqueeze(2)
        v = sparsity.linear(self, "v_proj", x).unflatten(-1, (self.n_kv, self.head_dim)).unsqueeze(2)
        slots = torch.arange(self.max_len, device=x.device)
        write = (slots[None, :] == pos[:, None])[:, None, :, None]  # (B, 1, max_len, 1)
        key_cache = torch.where(write, k.to(key_cache.dtype), key_cache)
        value_cache = torch.where(write, v.to(value_cache.dtype), value_cache)
        mask = (slots[None, :] <= pos[:, None])[:, None, None, :]  # (B, 1, 1, max_len)
        out = self._attend(q, key_cache, value_cache, mask).squeeze(2).flatten(1)
        return sparsity.linear(self, "o_proj", out), key_cache, value_cache


# --------------------------------------------------------------------------- feed-forwards
class GatedMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        f, d = config.mlp.ffn_size, config.d_model
        self.activation = config.mlp.activation
        self.w1 = nn.Parameter(torch.empty(2 * f, d))  # [gate; up]
        self.w2 = nn.Parameter(torch.empty(d, f))
        self.sparse = None
        self.record = None  # calibration: record(name, tensor) receives fc2's input

    def forward(self, x):
        if self.sparse is None and self.record is None:
            return ref_ops.gated_ffn_ref(x, self.w1, self.w2, self.activation)
        return sparsity.sparse_gated_mlp_ref(x, self.w1, self.w2, self.activation, self.sparse, self.record)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        m, d = config.moe, config.d_model
        self.router_kind, self.top_k, self.activation = m.router, m.top_k, m.activation
        self.router = nn.Linear(d, m.n_experts, bias=m.router_bias)
        self.w1 = nn.Parameter(torch.empty(m.n_experts, 2 * m.ffn_size, d))  # per expert [gate; up] (fc1)
        self.w2 = nn.Parameter(torch.empty(m.n_experts, d, m.ffn_size))  # per expert fc2
        self.sparse = None
        self.record = None

    def route(self, x2d):
        return ref_ops.route_ref(self.router(x2d), self.router_kind, self.top_k)

    def forward(self, x):
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        if self.sparse is not None or self.record is not None:
            return sparsity.sparse_moe_ref(x2d, self.router.weight, self.router.bias, self.w1, self.w2, self.router_kind,
                                           self.top_k, self.activation, self.sparse, self.record).reshape(shape)
        return ref_ops.routed_moe_ref(x2d, self.router.weight, self.router.bias, self.w1, self.w2, self.router_kind,
                                      self.top_k, self.activation).reshape(shape)
