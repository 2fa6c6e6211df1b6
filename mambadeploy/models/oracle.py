"""Test oracles: plain, slow, obviously-right versions of the MoE layer and of the whole model.

Nothing here is shared with the fast path except the parameters: no ref_ops, no static gather, no batching, no
padding. Every token is routed and computed on its own, every sequence runs alone, one position at a time, with the
recurrences written out as in the papers. Used only by tests (and by validate as a last-resort referee).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .layers import MoE


def _act(x, name):
    if name == "gelu":
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    if name == "silu":
        return x * torch.sigmoid(x)
    raise ValueError(name)


def _gated_ffn(x, w1, w2, activation):
    """x (d,); w1 (2F, d) = [gate; up]; w2 (d, F)."""
    f = w1.shape[0] // 2
    gate, up = w1[:f].float() @ x, w1[f:].float() @ x
    return w2.float() @ (_act(gate, activation) * up)


def _choose(logits, router: str, top_k: int):
    """One token's router logits (E,) -> list of (expert, weight)."""
    if router == "sigmoid_top1":
        e = int(torch.argmax(logits))
        return [(e, torch.sigmoid(logits[e]))]
    probs = torch.softmax(logits, dim=-1)
    order = sorted(range(len(probs)), key=lambda i: -float(probs[i]))  # stable: lower index wins a tie, like topk
    return [(e, probs[e]) for e in order[:top_k]]


@torch.no_grad()
def moe_oracle(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """x (..., d) -> (..., d) in fp32: each token routed alone, its chosen experts run one by one and summed."""
    flat = x.reshape(-1, x.shape[-1]).float()
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        logits = moe.router.weight.float() @ flat[t]
        if moe.router.bias is not None:
            logits = logits + moe.router.bias.float()
        for e, w in _choose(logits, moe.router_kind, moe.top_k):
            out[t] += w * _gated_ffn(flat[t], moe.w1[e], moe.w2[e], moe.activation)
    return out.reshape(x.shape)


def _rms(x, weight, eps):
    return x / torch.sqrt((x * x).mean() + eps) * weight.float()


def _norm(module, x, eps):
    if hasattr(module, "bias"):  # LayerNorm
        mu = x.mean()
        return (x - mu) / torch.sqrt(((x - mu) ** 2).mean() + eps) * module.weight.float() + module.bias.float()
    return _rms(x, module.weight, eps)


class _MambaOracle:
    """One Mamba-1 mixer, one sequence, one token at a time: conv window + SSM state h (d_inner, N)."""

    def __init__(self, mixer, eps):
        self.m, self.eps = mixer, eps
        self.window = torch.zeros(mixer.d_inner, mixer.d_conv)  # last d_conv conv inputs, newest last
        self.h = torch.zeros(mixer.d_inner, mixer.d_state)

    def __call__(self, x):
        m = self.m
        xz = m.in_proj.weight.float() @ x + (m.in_proj.bias.float() if m.in_proj.bias is not None else 0)
        u, z = xz[: m.d_inner], xz[m.d_inner:]
        self.window = torch.cat([self.window[:, 1:], u[:, None]], dim=1)
        c = (self.window * m.conv1d.weight[:, 0, :].float()).sum(-1)
        if m.conv1d.bias is not None:
            c = c + m.conv1d.bias.float()
        c = _act(c, "silu")
        proj = m.x_proj.weight.float() @ c
        dt, B, C = proj[: m.dt_rank], proj[m.dt_rank: m.dt_rank + m.d_state], proj[m.dt_rank + m.d_state:]
        if m.dt_norm is not None:
            dt, B, C = _rms(dt, m.dt_norm.weight, self.eps), _rms(B, m.B_norm.weight, self.eps), _rms(C, m.C_norm.weight, self.eps)
        delta = F.softplus(m.dt_proj.weight.float() @ dt + m.dt_proj.bias.float())  # (d_inner,)
        A = -torch.exp(m.A_log.float())  # (d_inner, N)
        self.h = torch.exp(delta[:, None] * A) * self.h + (delta * c)[:, None] * B[None, :]
        y = self.h @ C + m.D.float() * c
        y = y * _act(z, "silu")
        return m.out_proj.weight.float() @ y + (m.out_proj.bias.float() if m.out_proj.bias is not None else 0)


class _AttentionOracle:
    """One attention layer, one sequence: every key and value seen so far, no positions, GQA by head grouping."""

    def __init__(self, attn):
        self.a, self.keys, self.values = attn, [], []

    def __call__(self, x):
        a = self.a
        q = (a.q_proj.weight.float() @ x).reshape(a.n_heads, a.head_dim)
        self.keys.append((a.k_proj.weight.float() @ x).reshape(a.n_kv, a.head_dim))
        self.values.append((a.v_proj.weight.float() @ x).reshape(a.n_kv, a.head_dim))
        K, V = torch.stack(self.keys, 1), torch.stack(self.values, 1)  # (n_kv, T, hd)
        group = a.n_heads // a.n_kv
        heads = []
        for h in range(a.n_heads):
            scores = K[h // group] @ q[h] / math.sqrt(a.head_dim)
            heads.append(torch.softmax(scores, -1) @ V[h // group])
        return a.o_proj.weight.float() @ torch.cat(heads)


@torch.no_grad()
def model_oracle(model, ids: list[int]) -> torch.Tensor:
    """Logits (L, V) fp32 for ONE sequence, computed token by token from the model's parameters."""
    cfg, eps = model.config, model.config.norm_eps
    mixers = []
    for block in model.layers:
        kind = block.kind.mixer
        mixers.append(_MambaOracle(block.mixer, eps) if kind == "mamba" else
                      _AttentionOracle(block.mixer) if kind == "attention" else None)
    head = model.embedding.weight if model.lm_head is None else model.lm_head.weight
    rows = []
    for tok in ids:
        h = model.embedding.weight[tok].float()
        for block, mixer in zip(model.layers, mixers):
            if mixer is not None:
                h = h + mixer(_rms(h, block.mixer_norm.weight, eps))
            if block.ffn is not None:
                x = _rms(h, block.ffn_norm.weight, eps)
                if isinstance(block.ffn, MoE):
                    h = h + moe_oracle(block.ffn, x)
                else:
                    h = h + _gated_ffn(x, block.ffn.w1, block.ffn.w2, block.ffn.activation)
        rows.append(head.float() @ _norm(model.final_norm, h, cfg.norm_eps))
    return torch.stack(rows)
