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


def save_tiny_jamba(path, max_position_embeddings=256, seed=0):
    """A random transformers-built JambaForCausalLM (vocab 99, hidden 32, 4 layers: attention at layer 1, MoE of 2
    experts on odd layers, GQA 4 heads / 2 KV heads), fan-in initialised and saved with save_pretrained at `path`."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.JambaConfig(
        vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_period=3, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
        num_experts=2, num_experts_per_tok=2, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4,
        tie_word_embeddings=False, max_position_embeddings=max_position_embeddings, experts_implementation="eager",
        attn_implementation="eager")
    fan_in_init(transformers.JambaForCausalLM(config)).save_pretrained(path)
    return path
