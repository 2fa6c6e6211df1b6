"""torch-fast's decode state: FastState (the state tensors under the names of models/state.py, plus the static
buffers and CUDA graph of its decode step), a fresh state for prefill, and the adoption of another runner's state."""

from __future__ import annotations

from collections import OrderedDict

import torch

from ..errors import InputError
from ..models.state import state_specs


class FastState:
    """Decode state of one batch of sequences: `tensors` under the names of models/state.py (updated in place by
    step), the static buffers and CUDA graph of its decode step, and the host-side count of filled KV slots."""

    def __init__(self, tensors: OrderedDict[str, torch.Tensor], batch: int, filled: int = 0):
        self.tensors = tensors
        self.batch = batch
        self.filled = filled  # most KV-cache slots used by any row (attention models), known without a device sync
        self.tokens: torch.Tensor | None = None  # (B,) int64
        self.residual: torch.Tensor | None = None  # (B, d) fp32
        self.logits: torch.Tensor | None = None  # (B, V) fp32
        # Greedy feedback (the serving pool's decode steps): the step ends by writing each row's argmax into `tokens`
        # (the next step's ids, never leaving the device) and 1/0 into `finite` (all of the row's logits finite).
        # A caller may set tokens / finite to views of its own buffers before the first step (the graph keeps them).
        self.feedback = False
        self.finite: torch.Tensor | None = None  # (B,) int64, with feedback
        self.graph = None

    def clone(self) -> FastState:
        twin = FastState(OrderedDict((k, v.clone()) for k, v in self.tensors.items()), self.batch, self.filled)
        for name in ("tokens", "residual", "logits", "finite"):
            value = getattr(self, name)
            setattr(twin, name, None if value is None else value.clone())
        twin.feedback = self.feedback
        return twin


def empty_state(config, dtype, kv_dtype, device, Bsz) -> OrderedDict[str, torch.Tensor]:
    """The attention layers' KV caches (zeros, kv_dtype, max_seq_len slots) and pos; the Mamba states start as
    None (zeros) and come from the first chunk."""
    tensors = OrderedDict()
    for spec in state_specs(config, dtype):
        if spec.name.endswith((".key", ".value")):
            tensors[spec.name] = torch.zeros(spec.concrete_shape(Bsz), dtype=kv_dtype, device=device)
        elif spec.name == "pos":
            tensors["pos"] = torch.zeros(Bsz, dtype=torch.int64, device=device)
        else:
            tensors[spec.name] = None
    return tensors


def adopt_state(config, dtype, kv_dtype, device, state) -> FastState:
    """A FastState holding copies of another runner's state ({name: tensor})."""
    tensors = OrderedDict()
    batch = None
    for spec in state_specs(config, dtype):
        if spec.name not in state:
            raise InputError(f"state is missing {spec.name!r}")
        value = torch.as_tensor(state[spec.name])
        want = kv_dtype if spec.name.endswith((".key", ".value")) else spec.dtype
        tensors[spec.name] = value.to(device=device, dtype=want).contiguous().clone()
        batch = value.shape[0]
    filled = int(tensors["pos"].max()) if "pos" in tensors else 0
    return FastState(tensors, batch, filled)

