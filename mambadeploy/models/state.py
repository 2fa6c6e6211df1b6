"""The one module that owns state naming.

State = an ordered dict of plain tensors: per Mamba layer `L{i}.conv` (B, d_inner, d_conv) and `L{i}.ssm`
(B, d_inner, d_state), both fp32; per attention layer `L{i}.key` / `L{i}.value` (B, kv_heads, max_len, head_dim) in the
model dtype; and, when the model has attention, one `pos` (B,) int64 = number of valid cache slots per row.
ONNX graphs and TensorRT bindings use the same names with `past.` / `present.` prefixes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig

State = "OrderedDict[str, torch.Tensor]"
PAST, PRESENT = "past.", "present."


@dataclass(frozen=True)
class StateSpec:
    name: str
    shape: tuple  # with the string "batch" for the batch dimension
    dtype: torch.dtype

    def concrete_shape(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if s == "batch" else s for s in self.shape)


def state_specs(config: ModelConfig, dtype: torch.dtype = torch.float32) -> list[StateSpec]:
    """The state tensors of a model, in graph order."""
    specs = []
    for i, layer in enumerate(config.layers):
        if layer.mixer == "mamba":
            m = config.mamba
            specs.append(StateSpec(f"L{i}.conv", ("batch", m.d_inner, m.d_conv), torch.float32))
            specs.append(StateSpec(f"L{i}.ssm", ("batch", m.d_inner, m.d_state), torch.float32))
        elif layer.mixer == "attention":
            a = config.attention
            shape = ("batch", a.n_kv_heads, config.max_seq_len, a.head_dim)
            specs.append(StateSpec(f"L{i}.key", shape, dtype))
            specs.append(StateSpec(f"L{i}.value", shape, dtype))
    if config.has_attention:
        specs.append(StateSpec("pos", ("batch",), torch.int64))
    return specs


def state_bytes_per_sequence(config: ModelConfig, dtype: torch.dtype = torch.float32) -> int:
    total = 0
    for s in state_specs(config, dtype):
        n = 1
        for d in s.concrete_shape(1):
            n *= d
        total += n * torch.empty((), dtype=s.dtype).element_size()
    return total


def state_bytes_by_kind(config: ModelConfig, dtype: torch.dtype = torch.float32,
                        kv_dtype: torch.dtype | None = None) -> dict:
    """Bytes one sequence holds: {"recurrent": Mamba conv + SSM states (fixed), "kv": attention KV cache at
    config.max_seq_len slots in kv_dtype (None: dtype), "pos": the fill counter}."""
    out = {"recurrent": 0, "kv": 0, "pos": 0}
    for s in state_specs(config, dtype):
        n = 1
        for d in s.concrete_shape(1):
            n *= d
        is_kv = s.name.endswith((".key", ".value"))
        kind = "kv" if is_kv else ("pos" if s.name == "pos" else "recurrent")
        out[kind] += n * torch.empty((), dtype=(kv_dtype or s.dtype) if is_kv else s.dtype).element_size()
    return out


def layer_of(name: str) -> int | None:
    """`L3.ssm` -> 3; `pos` -> None."""
    return int(name[1:].split(".")[0]) if name.startswith("L") else None
