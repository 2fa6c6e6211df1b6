"""Shared by the parallel tests: a tiny transformers-built Jamba saved as safetensors (no download)."""

from __future__ import annotations

import pytest
import torch
from hf_tiny import fan_in_init

HF_VOCAB = 99


def hf_jamba_config(**kw):
    """transformers' own test sizes (vocab 99, hidden 32, 2 experts top-2), with widths that tp=2 divides and ONE KV
    head (tp=2 then replicates it); 5 layers cover Mamba+MLP, attention+MoE, Mamba+MoE and attention+MLP."""
    transformers = pytest.importorskip("transformers")
    base = {"vocab_size": HF_VOCAB, "hidden_size": 32, "intermediate_size": 36, "num_hidden_layers": 5,
            "num_attention_heads": 4, "num_key_value_heads": 1, "attn_layer_period": 3, "attn_layer_offset": 1,
            "expert_layer_period": 2, "expert_layer_offset": 1, "num_experts": 2, "num_experts_per_tok": 2,
            "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_dt_rank": 4, "tie_word_embeddings": False,
            "experts_implementation": "eager", "attn_implementation": "eager"}
    base.update(kw)
    return transformers.JambaConfig(**base)


def save_hf_jamba(path) -> str:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = fan_in_init(transformers.JambaForCausalLM(hf_jamba_config()))
    model.save_pretrained(path)
    return str(path)
