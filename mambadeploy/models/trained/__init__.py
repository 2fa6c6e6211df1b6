"""Trained testbed models: small BlackMamba-, MoE-Mamba- and Jamba-family models trained on the CPython standard
library's sources (byte-level vocabulary), committed in our checkpoint format beside this file, one directory each.
`scripts/train_testbed.py` reproduces them. They are presets (`load_model("blackmamba-small-trained")`) whose weights
mean something: SCAP's perplexity cost and low-precision agreement are measured on them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..config import AttentionConfig, MambaConfig, MLPConfig, ModelConfig, MoEConfig
from ..presets import _alternating, blackmamba_config, jamba_layers

BYTE_VOCAB = 256
HERE = Path(__file__).resolve().parent


def _blackmamba_small():
    return blackmamba_config(4, 96, 96, n_experts=4, vocab=BYTE_VOCAB, name="blackmamba-small-trained")


def _moe_mamba_small():
    return ModelConfig(
        family="moe-mamba", name="moe-mamba-small-trained", vocab_size=BYTE_VOCAB, d_model=96, layers=_alternating(4),
        mamba=MambaConfig(d_inner=192, d_state=16, d_conv=4),
        moe=MoEConfig(n_experts=4, ffn_size=96, top_k=1, router="softmax_topk", router_bias=False, activation="silu"),
        final_norm="rmsnorm", tie_embeddings=True, max_seq_len=2048,
    )


def _jamba_small():
    return ModelConfig(
        family="jamba", name="jamba-small-trained", vocab_size=BYTE_VOCAB, d_model=80, layers=jamba_layers(4, 4, 2, 2, 1),
        mamba=MambaConfig(d_inner=160, d_state=16, d_conv=4, dt_rank=5, conv_bias=True, proj_bias=False, bcdt_norm=True),
        attention=AttentionConfig(n_heads=4, n_kv_heads=2, head_dim=20),
        moe=MoEConfig(n_experts=4, ffn_size=80, top_k=2, router="softmax_topk", router_bias=False, activation="silu"),
        mlp=MLPConfig(ffn_size=96, activation="silu"),
        final_norm="rmsnorm", tie_embeddings=False, norm_eps=1e-6, max_seq_len=1024,
    )


TRAINED_CONFIGS = {
    "blackmamba-small-trained": _blackmamba_small,
    "moe-mamba-small-trained": _moe_mamba_small,
    "jamba-small-trained": _jamba_small,
}


def trained_dir(name: str) -> Path:
    return HERE / name


def corpus_files(stdlib: Path) -> list[Path]:
    return sorted(p for p in Path(stdlib).glob("*.py") if p.is_file())


def corpus_split(stdlib: Path) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(train bytes, held-out bytes, sha256 of both) as uint8 tensors: every 10th file, by sorted name, is held out."""
    train, held = [], []
    for i, path in enumerate(corpus_files(stdlib)):
        (held if i % 10 == 9 else train).append(path.read_bytes() + b"\n")
    train_b, held_b = b"".join(train), b"".join(held)
    digest = hashlib.sha256(train_b + b"\0" + held_b).hexdigest()
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8).clone()
    return as_tensor(train_b), as_tensor(held_b), digest


def heldout_bytes() -> torch.Tensor:
    import sysconfig

    return corpus_split(Path(sysconfig.get_paths()["stdlib"]))[1]


def resolve(target):
    """A trained preset's name -> its committed checkpoint directory; anything else unchanged."""
    if isinstance(target, str) and target in TRAINED_CONFIGS:
        return trained_dir(target)
    return target
