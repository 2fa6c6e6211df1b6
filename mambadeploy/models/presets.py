"""Presets: configs with seeded random weights built in memory (no download). Tiny ones for CI, full-size shapes
(the real BlackMamba dimensions from FACTS.md) for benchmarks."""

from __future__ import annotations

import math

from ..errors import CheckpointError
from .config import AttentionConfig, LayerSpec, MambaConfig, MLPConfig, ModelConfig, MoEConfig


def _alternating(n_layers: int) -> list[LayerSpec]:
    """BlackMamba / MoE-Mamba: Mamba-only, MoE-only, Mamba-only, ..."""
    return [LayerSpec("mamba", "none") if i % 2 == 0 else LayerSpec("none", "moe") for i in range(n_layers)]


def blackmamba_config(n_layers, d_model, ffn, n_experts=8, vocab=50304, name="", activation="gelu") -> ModelConfig:
    return ModelConfig(
        family="blackmamba", name=name, vocab_size=vocab, d_model=d_model, layers=_alternating(n_layers),
        mamba=MambaConfig(d_inner=2 * d_model, d_state=16, d_conv=4, dt_rank=math.ceil(d_model / 16)),
        moe=MoEConfig(n_experts=n_experts, ffn_size=ffn, top_k=1, router="sigmoid_top1", router_bias=True,
                      activation=activation),
        final_norm="layernorm", tie_embeddings=True, norm_eps=1e-5, max_seq_len=2048,
    )


def jamba_layers(n_layers, attn_period=8, attn_offset=4, expert_period=2, expert_offset=1) -> list[LayerSpec]:
    return [
        LayerSpec("attention" if i % attn_period == attn_offset else "mamba",
                  "moe" if i % expert_period == expert_offset else "mlp")
        for i in range(n_layers)
    ]


def _blackmamba_tiny():
    return blackmamba_config(4, 64, 96, n_experts=4, vocab=512, name="blackmamba-tiny")


def _moe_mamba_tiny():
    return ModelConfig(
        family="moe-mamba", name="moe-mamba-tiny", vocab_size=512, d_model=64, layers=_alternating(4),
        mamba=MambaConfig(d_inner=128, d_state=8, d_conv=4),
        moe=MoEConfig(n_experts=4, ffn_size=96, top_k=1, router="softmax_topk", router_bias=False, activation="silu"),
        final_norm="rmsnorm", tie_embeddings=True, max_seq_len=2048,
    )


def _jamba_tiny():
    return ModelConfig(
        family="jamba", name="jamba-tiny", vocab_size=512, d_model=48, layers=jamba_layers(4, 4, 2, 2, 1),
        mamba=MambaConfig(d_inner=96, d_state=8, d_conv=4, dt_rank=4, conv_bias=True, proj_bias=False, bcdt_norm=True),
        attention=AttentionConfig(n_heads=4, n_kv_heads=2, head_dim=12),
        moe=MoEConfig(n_experts=4, ffn_size=64, top_k=2, router="softmax_topk", router_bias=False, activation="silu"),
        mlp=MLPConfig(ffn_size=64, activation="silu"),
        final_norm="rmsnorm", tie_embeddings=False, norm_eps=1e-6, max_seq_len=512,
    )


def _jamba_mini():
    """Jamba-1.5-Mini's shape (52B, AI21's config.json): 32 layers, 1 attention : 7 Mamba, MoE every other layer."""
    return ModelConfig(
        family="jamba", name="jamba-1.5-mini", vocab_size=65536, d_model=4096, layers=jamba_layers(32),
        mamba=MambaConfig(d_inner=8192, d_state=16, d_conv=4, dt_rank=256, conv_bias=True, proj_bias=False,
                          bcdt_norm=True),
        attention=AttentionConfig(n_heads=32, n_kv_heads=8, head_dim=128),
        moe=MoEConfig(n_experts=16, ffn_size=14336, top_k=2, router="softmax_topk", router_bias=False,
                      activation="silu"),
        mlp=MLPConfig(ffn_size=14336, activation="silu"),
        final_norm="rmsnorm", tie_embeddings=False, norm_eps=1e-6, max_seq_len=4096,
    )


PRESETS = {
    "blackmamba-tiny": _blackmamba_tiny,
    "moe-mamba-tiny": _moe_mamba_tiny,
    "jamba-tiny": _jamba_tiny,
    "blackmamba-1.5b": lambda: blackmamba_config(30, 1152, 3072, name="blackmamba-1.5b"),
    "blackmamba-2.8b": lambda: blackmamba_config(36, 1472, 3872, name="blackmamba-2.8b"),
    "jamba-1.5-mini": _jamba_mini,
}
TINY_PRESETS = ("blackmamba-tiny", "moe-mamba-tiny", "jamba-tiny")
DEFAULT_PRESET = "blackmamba-tiny"


def preset_config(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise CheckpointError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]()
