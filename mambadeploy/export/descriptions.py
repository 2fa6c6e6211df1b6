"""One declarative export description per model family: which graphs, which layer kinds the exporter has been checked
on, dummy inputs for tracing, dynamic axes, tolerances a runner must meet. Registered by decorator; the exporter and the
tests look descriptions up by the config's family.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import MambaDeployError
from ..models.config import ModelConfig

OPS_MODES = ("portable", "custom", "contrib", "standard")
GRAPHS = ("prefill", "decode")
DEFAULT_OPSET = 21  # Gelu (20) and ScatterElements reduction (16) need >= 20; ORT >= 1.18 runs 21
MIN_OPSET = 20


@dataclass(frozen=True)
class ExportDescription:
    family: str
    layer_kinds: frozenset  # (mixer, ffn) pairs this family's export is checked on
    graphs: tuple = GRAPHS
    # tracing inputs: batch > 1 and a length that is neither 1 nor a validation length, so nothing specialises on them
    dummy_batch: int = 2
    dummy_length: int = 9
    dummy_lengths: tuple = (9, 5)  # left padding exercised during the trace
    max_batch: int = 256
    # per graph: input/output name -> {axis: symbol}; the state I/O all get {0: "batch"}
    dynamic_axes: dict = field(default_factory=lambda: {
        "prefill": {"input_ids": {0: "batch", 1: "length"}, "lengths": {0: "batch"}, "logits": {0: "batch"}},
        "decode": {"input_ids": {0: "batch"}, "logits": {0: "batch"}},
    })
    validation_shapes: tuple = ((1, 1), (3, 7), (1, 33), (3, 154))  # (batch, length) checked after export

    def check_config(self, config: ModelConfig) -> None:
        """Refuse layers this family's export has not been checked on, naming them."""
        bad = [f"layer {i} ({l.mixer} mixer + {l.ffn} feed-forward)" for i, l in enumerate(config.layers)
               if (l.mixer, l.ffn) not in self.layer_kinds]
        if bad:
            supported = ", ".join(f"{m}+{f}" for m, f in sorted(self.layer_kinds))
            raise MambaDeployError(f"cannot export {', '.join(bad)} of a {config.family} model: the {config.family} "
                                   f"export handles {supported}")

    def max_length(self, config: ModelConfig) -> int | None:
        """Tokens one sequence may hold (prompt + generated): the attention KV cache, else unbounded."""
        return config.max_seq_len if config.has_attention else None


DESCRIPTIONS: dict[str, ExportDescription] = {}


def register_description(*families: str):
    """Class or function decorator: the decorated factory returns the ExportDescription for these families."""
    def wrap(factory):
        for fam in families:
            if fam in DESCRIPTIONS:
                raise MambaDeployError(f"export description for {fam!r} registered twice")
            DESCRIPTIONS[fam] = factory(fam)
        return factory
    return wrap


def description_for(config: ModelConfig) -> ExportDescription:
    if config.family not in DESCRIPTIONS:
        raise MambaDeployError(f"no export description for family {config.family!r}; known: {', '.join(DESCRIPTIONS)}")
    return DESCRIPTIONS[config.family]


# --------------------------------------------------------------------------- the families
@register_description("blackmamba", "moe-mamba")
def _alternating_mamba_moe(family):
    # Mamba-only and MoE-only blocks (dense-MLP blocks too, for variants that mix them in)
    return ExportDescription(family, frozenset({("mamba", "none"), ("none", "moe"), ("none", "mlp"),
                                                ("mamba", "moe"), ("mamba", "mlp")}))


@register_description("mamba")
def _mamba(family):
    return ExportDescription(family, frozenset({("mamba", "none"), ("mamba", "mlp")}))


@register_description("jamba")
def _jamba(family):
    # attention layers bring a KV cache (max_seq_len slots) and `pos`; the dummy length stays far below the cache
    return ExportDescription(family, frozenset({(m, f) for m in ("mamba", "attention") for f in ("mlp", "moe", "none")}))
