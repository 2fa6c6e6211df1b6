"""The Runner interface every backend implements (torch eager, torch-fast, ORT, TensorRT).

`generate` and `validate` only ever see this: backends differ in how they hold state (torch tensors, OrtValues,
device buffers), never in the shape of these calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..models.config import ModelConfig

# Prompt tokens per prefill chunk (TorchFastRunner(prefill_chunk=...), OrtRunner on an export with a GroupQueryAttention
# prefill_state graph, CLI --prefill-chunk). Peak activation memory of prefill is set by the chunk, not the prompt; 8K
# tokens keep every GEMM long (the GPU run of benchmarks/long_context.py measures the memory it takes).
PREFILL_CHUNK_DEFAULT = 8192


class Runner(ABC):
    backend: str = "?"
    config: ModelConfig

    @abstractmethod
    def prefill(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None):
        """input_ids (B, L) int64, left-padded; lengths (B,) real lengths or None (all L).
        Returns (logits of the last position (B, V) fp32 torch tensor, opaque state)."""

    @abstractmethod
    def step(self, token_ids: torch.Tensor, state):
        """token_ids (B,) int64. Returns (logits (B, V) fp32 torch tensor, new state)."""

    @abstractmethod
    def describe(self) -> dict:
        """backend, device, dtype, library versions."""

    def synchronize(self) -> None:
        """Wait for queued device work (timing)."""

    @property
    def max_length(self) -> int | None:
        """Most tokens (prompt + generated) one sequence may hold, or None when unbounded (pure recurrent models)."""
        return self.config.max_seq_len if self.config.has_attention else None

    def state_to_torch(self, state) -> dict:
        """The state as {name: torch tensor} (for per-state comparisons in validate)."""
        return dict(state)
