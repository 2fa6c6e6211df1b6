"""One config for all three families: a list of layers, each with a mixer (Mamba-1 / attention / none) and a
feed-forward (none / dense gated MLP / MoE), plus the shared hyper-parameters of each kind.

The config is plain data (JSON round-trip) so that it can be written into checkpoints and export manifests.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..errors import ConfigError, check_fields

MIXERS = ("mamba", "attention", "none")
FFNS = ("none", "mlp", "moe")
ROUTERS = ("sigmoid_top1", "softmax_topk")
ACTIVATIONS = ("gelu", "silu", "gelu_tanh")
FAMILIES = ("blackmamba", "moe-mamba", "jamba", "mamba")


@dataclass
class MambaConfig:
    d_inner: int
    d_state: int = 16
    d_conv: int = 4
    dt_rank: int = 0  # 0 = ceil(d_model / 16), set by ModelConfig
    conv_bias: bool = True
    proj_bias: bool = False
    bcdt_norm: bool = False  # Jamba: RMSNorm on dt, B and C


@dataclass
class AttentionConfig:
    n_heads: int
    n_kv_heads: int
    head_dim: int


@dataclass
class MoEConfig:
    n_experts: int
    ffn_size: int
    top_k: int = 1
    router: str = "sigmoid_top1"  # BlackMamba: sigmoid, argmax; MoE-Mamba / Jamba: softmax, top-k, no renorm
    router_bias: bool = False
    activation: str = "gelu"


@dataclass
class MLPConfig:
    ffn_size: int
    activation: str = "silu"


@dataclass
class LayerSpec:
    mixer: str = "mamba"
    ffn: str = "none"


@dataclass
class ModelConfig:
    family: str
    vocab_size: int
    d_model: int
    layers: list[LayerSpec]
    mamba: MambaConfig | None = None
    attention: AttentionConfig | None = None
    moe: MoEConfig | None = None
    mlp: MLPConfig | None = None
    norm_eps: float = 1e-5
    final_norm: str = "layernorm"  # BlackMamba: LayerNorm with bias; Mamba / Jamba: RMSNorm
    tie_embeddings: bool = True
    max_seq_len: int = 2048  # KV-cache length of attention layers
    name: str = ""
    extra: dict = field(default_factory=dict)  # source-format facts kept for provenance (not used by the math)
    sparsity: dict = field(default_factory=dict)  # SCAP activation sparsity (models/sparsity.py); {} = dense

    def __post_init__(self):
        # types first: a "36" where an int belongs otherwise surfaces as "'<=' not supported between 'str' and 'int'"
        check_fields(type(self), dataclasses.asdict(self), "model config", ConfigError)
        self.layers = [l if isinstance(l, LayerSpec) else LayerSpec(**l) for l in self.layers]
        for kind, cls in (("mamba", MambaConfig), ("attention", AttentionConfig), ("moe", MoEConfig), ("mlp", MLPConfig)):
            value = getattr(self, kind)
            if isinstance(value, dict):
                setattr(self, kind, cls(**value))
        if self.mamba is not None and not self.mamba.dt_rank:
            self.mamba.dt_rank = math.ceil(self.d_model / 16)
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        problems = []
        if self.family not in FAMILIES:
            problems.append(f"family {self.family!r} not in {FAMILIES}")
        if self.vocab_size <= 0 or self.d_model <= 0:
            problems.append("vocab_size and d_model must be positive")
        if not self.layers:
            problems.append("no layers")
        for i, spec in enumerate(self.layers):
            if spec.mixer not in MIXERS:
                problems.append(f"layer {i}: unknown mixer {spec.mixer!r} (supported: {MIXERS})")
            if spec.ffn not in FFNS:
                problems.append(f"layer {i}: unknown feed-forward {spec.ffn!r} (supported: {FFNS})")
            if spec.mixer == "none" and spec.ffn == "none":
                problems.append(f"layer {i}: has neither mixer nor feed-forward")
            for needed, cfg in (("mamba", self.mamba), ("attention", self.attention)):
                if spec.mixer == needed and cfg is None:
                    problems.append(f"layer {i}: mixer {needed!r} but no {needed} config")
            for needed, cfg in (("moe", self.moe), ("mlp", self.mlp)):
                if spec.ffn == needed and cfg is None:
                    problems.append(f"layer {i}: feed-forward {needed!r} but no {needed} config")
        if self.moe is not None:
            if self.moe.router not in ROUTERS:
                problems.append(f"moe.router {self.moe.router!r} not in {ROUTERS}")
            if self.moe.activation not in ACTIVATIONS:
                problems.append(f"moe.activation {self.moe.activation!r} not in {ACTIVATIONS}")
            if not 1 <= self.moe.top_k <= self.moe.n_experts:
                problems.append(f"moe.top_k={self.moe.top_k} must be in [1, n_experts={self.moe.n_experts}]")
            if self.moe.router == "sigmoid_top1" and self.moe.top_k != 1:
                problems.append("the sigmoid router is top-1 only")
        if self.mlp is not None and self.mlp.activation not in ACTIVATIONS:
            problems.append(f"mlp.activation {self.mlp.activation!r} not in {ACTIVATIONS}")
        if self.attention is not None and self.attention.n_heads % self.attention.n_kv_heads:
            problems.append("attention.n_heads must be a multiple of n_kv_heads")
        if self.final_norm not in ("layernorm", "rmsnorm"):
            problems.append(f"final_norm {self.final_norm!r} not in ('layernorm', 'rmsnorm')")
        if self.sparsity:
            from .sparsity import check_config

            problems += check_config(self)
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))

    # ------------------------------------------------------------------ views
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def has_attention(self) -> bool:
        return any(l.mixer == "attention" for l in self.layers)

    def layer_pattern(self) -> str:
        """One character per (mixer, ffn): M=Mamba, A=attention, -=none; then e=MoE, f=dense MLP, nothing for none."""
        out = []
        for spec in self.layers:
            s = {"mamba": "M", "attention": "A", "none": ""}[spec.mixer] + {"moe": "E", "mlp": "F", "none": ""}[spec.ffn]
            out.append(s)
        return " ".join(out)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "model config") -> "ModelConfig":
        """`where` (the file it came from) leads every error, which names the field, the type expected and the value."""
        check_fields(cls, data, where, ConfigError)
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
