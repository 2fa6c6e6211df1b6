"""Helpers for the tiny transformers-built checkpoints several test modules write (no download)."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def fan_in_init(model, seed=0):
    """transformers' init (std 0.02) gives near-zero logits where greedy decoding is a string of near-ties; use
    fan-in scaled weights instead (A_log, D and dt bias keep transformers' Mamba init). Embeddings at std 0.3: larger
    ones make a tied head echo its input, and greedy decoding falls into a one-token loop."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(("A_log", ".D", "dt_proj.bias")):
            continue
        if p.dim() == 1:
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        elif "embed" in name:
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return model.eval()
