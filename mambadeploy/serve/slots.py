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

Token feedback: `feed` holds, per row, the id the next step is fed (row 0) and whether the last step's logits were all
finite (row 1). Every step ends by writing its greedy picks there: torch-fast inside its CUDA graph (FastState
feedback), the other backends with two eager ops after their step. So a greedy sequence's next id never visits the
host; the host learns the picks through ONE asynchronous copy of `feed` into a pinned buffer and an event
(`launch` returns a LaunchedStep; `result()` waits), which lets the batcher queue the next step before it reads this
one's tokens. Everything the host asks of the pool (moves, prefill writes, host-chosen ids) is queued on the same
stream, so it lands after the step in flight and before the next.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from ..errors import InputError, MambaDeployError
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
    """State rows for up to max_batch sequences, in the layout of `runner`'s state; `launch` steps rows [0, n)."""

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
        self.feed = torch.zeros(2, max_batch, dtype=torch.int64, device=self.device)  # (next ids, finite flags)
        cuda = self.device.type == "cuda"
        # two host buffers (pinned: an asynchronous copy) and their events, used in turn: the copy of step k+1 may
        # land while the host still reads step k's. Made once: nothing is allocated per step
        self._host = [torch.zeros(2, max_batch, dtype=torch.int64, pin_memory=cuda) for _ in range(2)]
        self._events = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self._turn = 0
        # the batcher's default: pipeline the steps where the host can run ahead of the device. torch-fast on CUDA
        # only: its step makes no host sync; the others may stay synchronous (and on the CPU every call has finished
        # when it returns, so overlapping gains nothing there)
        self.overlaps = cuda and runner.backend == "torch-fast"

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def write(self, first_row: int, state) -> None:
        """Copy a prefill's state (batch k, the runner's own kind) into rows [first_row, first_row + k)."""
        source = self.runner.state_to_torch(state)
        for name, dst in self.tensors.items():
            src = torch.as_tensor(source[name])
            dst[first_row:first_row + src.shape[0]].copy_(src.to(dst.device, dst.dtype))

    def move(self, src_row: int, dst_row: int) -> None:
        """Row dst takes row src's state and next id (compaction after a sequence leaves). One foreach call for every
        tensor: a Python loop of copies was one launch and one GIL release per tensor (~36 on a 2.8B model)."""
        if src_row != dst_row:
            tensors = [*self.tensors.values(), self.feed.T]
            torch._foreach_copy_([t[dst_row] for t in tensors], [t[src_row] for t in tensors])

    def set_tokens(self, first_row: int, tokens: list[int]) -> None:
        """The ids rows [first_row, first_row + k) are fed next (admission, host-sampled rows): one small copy up."""
        self.feed[0, first_row:first_row + len(tokens)].copy_(torch.tensor(tokens, dtype=torch.int64))

    def launch(self, n: int, filled: int = 0) -> LaunchedStep:
        """Queue one decode step of rows [0, n), fed feed[0, :n]; filled = the most KV slots any live row holds
        (attention models). Its picks land in `feed` and are copied to the host asynchronously."""
        if "pos" in self.tensors and filled >= self.runner.config.max_seq_len:  # the runner's own check, bypassed
            raise InputError(f"a sequence reached the attention KV cache length ({self.runner.config.max_seq_len})")
        b = self.bucket(n)
        if n < b and "pos" in self.tensors:
            self.tensors["pos"][n:b].zero_()  # padding rows: keep their cache position inside the cache
        if self.runner.backend == "torch-fast":
            logits = self._step_fast(b, filled)  # picks written inside its graph
        else:
            views = self.views(b)
            state = _ort_state(self.runner, views, b, filled) if self.runner.backend == "ort" else views
            logits = self._step_copying(b, views, state)
            torch.argmax(logits, dim=-1, out=self.feed[0, :b])
            self.feed[1, :b].copy_(torch.isfinite(logits).all(dim=-1))
        host, event = self._host[self._turn], self._events[self._turn]
        self._turn ^= 1
        host.copy_(self.feed, non_blocking=True)  # the whole (2, max_batch): one copy, no per-step slicing
        if event is not None:
            event.record()
        return LaunchedStep(n, logits, host, event)

    def views(self, b: int) -> OrderedDict:
        """{name: rows [0, b) of the pool} (one view per state tensor: dozens of torch calls on a large model)."""
        return OrderedDict((name, t[:b]) for name, t in self.tensors.items())

    def _step_fast(self, b, filled):
        """The bucket's FastState is built once over views of the pool, fed from and picking into `feed` (its graph
        reads and writes them in place): a step is one graph replay, with no copy in, no logits clone out and no
        per-tensor Python."""
        st = self._fast_states.get(b)
        if st is None:
            from ..runtime.torch_fast import FastState

            st = self._fast_states[b] = FastState(self.views(b), b)
            st.tokens, st.finite, st.feedback = self.feed[0, :b], self.feed[1, :b], True
        st.filled = filled
        self.runner.advance(st)
        return st.logits

    def _step_copying(self, b, views, state):
        logits, new = self.runner.step(self.feed[0, :b], state)
        for name, tensor in self.runner.state_to_torch(new).items():
            views[name].copy_(torch.as_tensor(tensor).to(self.device))
        return logits


class LaunchedStep:
    """A queued decode step of n rows: `logits` (bucket rows, V; rows [0, n) are live; valid until the next step of
    its bucket) and its picks, on their way to a host buffer (read it before the step after next is launched)."""
    __slots__ = ("_event", "_host", "logits", "n")

    def __init__(self, n, logits, host, event):
        self.n, self.logits, self._host, self._event = n, logits, host, event

    def result(self) -> tuple[list[int], list[int]]:
        """(greedy ids, finite flags) of rows [0, n), once the step's copy to the host is done (blocks until then)."""
        if self._event is not None:
            self._event.synchronize()  # releases the GIL while it waits
        picks, finite = self._host[:, :self.n].tolist()
        return picks, finite


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
