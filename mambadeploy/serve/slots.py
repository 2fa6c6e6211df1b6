"""A pool of recurrent-state slots for in-flight batching: one row per live sequence, preallocated up to max_batch.

Live sequences always occupy rows [0, n): a finished sequence's row is refilled by moving the last live row into it, so
a decode step runs on the first `bucket(n)` rows, whose tensors are contiguous views of the pool. Padding rows between
n and the bucket compute garbage that nobody reads (their KV position is reset each step so it never runs past the
cache). The pool tensors are named as models/state.py names them; each backend adapts the views to its own state:
- torch: a plain {name: view} dict; the reference step returns new tensors, copied back into the views.
- torch-fast: one FastState per bucket whose tensors ARE the views, so its CUDA graph (one per bucket) reads and
  writes the pool in place: nothing is copied per step.
- trt: a {name: view} dict (the runner copies it into its bindings), the new state copied back.
- ort: OrtValues made from the views (CPU arrays, no CUDA graph), the new state copied back.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from ..errors import MambaDeployError
from ..models.state import state_specs
from ..runtime.base import Runner


def bucket_sizes(max_batch: int) -> list[int]:
    """Powers of two below max_batch, then max_batch: the batch sizes a decode step runs at (one CUDA graph each)."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


class SlotPool:
    """State rows for up to max_batch sequences, in the layout of `runner`'s state; `step` advances rows [0, n)."""

    def __init__(self, runner: Runner, max_batch: int, device=None):
        if max_batch < 1:
            raise MambaDeployError(f"max batch must be >= 1, got {max_batch}")
        self.runner = runner
        self.max_batch = max_batch
        self.buckets = bucket_sizes(max_batch)
        self.device = torch.device(device or _runner_device(runner))
        model = getattr(runner, "model", None)
        dtype = model.dtype if model is not None else getattr(runner, "dtype", torch.float32)
        self.tensors = OrderedDict(
            (s.name, torch.zeros(s.concrete_shape(max_batch), dtype=s.dtype, device=self.device))
            for s in state_specs(runner.config, dtype))
        self._fast_states: dict = {}  # torch-fast: bucket -> FastState over views of the pool
        self._tokens = torch.zeros(max_batch, dtype=torch.int64, device=self.device)

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def write(self, first_row: int, state) -> None:
        """Copy a prefill's state (batch k, the runner's own kind) into rows [first_row, first_row + k)."""
        source = self.runner.state_to_torch(state)
        for name, dst in self.tensors.items():
            src = torch.as_tensor(source[name])
            dst[first_row:first_row + src.shape[0]].copy_(src.to(dst.device, dst.dtype))

    def move(self, src_row: int, dst_row: int) -> None:
        """Row dst takes row src's state (compaction after a sequence leaves)."""
        if src_row != dst_row:
            for t in self.tensors.values():
                t[dst_row].copy_(t[src_row])

    def step(self, tokens: torch.Tensor, n: int, filled: int = 0) -> torch.Tensor:
        """One decode step of rows [0, n) fed `tokens` (n,); filled = the most KV slots any live row holds (attention
        models). Returns logits (n, V) fp32."""
        b = self.bucket(n)
        self._tokens[:n].copy_(tokens)
        self._tokens[n:b].zero_()
        if "pos" in self.tensors:
            self.tensors["pos"][n:b].zero_()  # padding rows: keep their cache position inside the cache
        backend = self.runner.backend
        if backend == "torch-fast":
            return self._step_fast(b, filled)[:n]
        views = self.views(b)
        if backend == "ort":
            logits = self._step_copying(b, views, _ort_state(self.runner, views, b, filled))
        else:  # torch eager and TensorRT take a {name: tensor} state
            logits = self._step_copying(b, views, views)
        return logits[:n]

    def views(self, b: int) -> OrderedDict:
        """{name: rows [0, b) of the pool} (one view per state tensor: dozens of torch calls on a large model)."""
        return OrderedDict((name, t[:b]) for name, t in self.tensors.items())

    def _step_fast(self, b, filled):
        """The bucket's FastState is built once over views of the pool: later steps touch no per-tensor Python."""
        st = self._fast_states.get(b)
        if st is None:
            from ..runtime.torch_fast import FastState

            st = self._fast_states[b] = FastState(self.views(b), b)
        st.filled = filled
        logits, _ = self.runner.step(self._tokens[:b], st)
        return logits

    def _step_copying(self, b, views, state):
        logits, new = self.runner.step(self._tokens[:b], state)
        for name, tensor in self.runner.state_to_torch(new).items():
            views[name].copy_(torch.as_tensor(tensor).to(self.device))
        return logits


def _runner_device(runner: Runner) -> str:
    if runner.backend in ("torch", "torch-fast"):
        model = getattr(runner, "model", None)
        return str(model.device) if model is not None else "cpu"
    if runner.backend == "trt":
        return str(runner.device)
    return "cpu"  # ORT: states are built from CPU arrays


def _ort_state(runner, views, batch, filled):
    """An OrtState of this runner holding copies of the views (CPU OrtValues)."""
    import onnxruntime as ort

    from ..runtime.ort_runner import OrtState

    values = {name: ort.OrtValue.ortvalue_from_numpy(t.contiguous().numpy()) for name, t in views.items()}
    return OrtState(values, batch, filled, runner.id)
