"""ParallelRunner: one rank of a tensor/expert-parallel run, behind the Runner interface (runtime/base.py).

Every rank runs the same calls with the same inputs (torchrun, or the workers of spawn.SpawnedRunner); each holds its
share of the weights and of the state, and gets the full logits (the LM head is replicated).

- State: this rank's share, under the names of models/state.py (`L{i}.conv` (B, d_inner/tp, K), KV caches of its
  heads); `state_to_torch` gathers the single-process state from every rank (a collective: all ranks call it).
- Decode on CUDA with `cuda_graph` (the default there): the sharded reference step, collectives included, is captured
  once per state into a CUDA graph over that state's buffers and replayed (NCCL supports capture); the state is then
  advanced in place. The MoE uses its mask dispatch inside a graph. Not yet run on a GPU (no multi-GPU machine lent).
- Hangs: every call runs under a deadline (the collective timeout plus a margin); a rank stuck past it (a peer killed
  while NCCL waits, say) prints one error line and exits with code 3 instead of hanging.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import OrderedDict

import torch

from .. import __version__
from ..errors import InputError
from ..runtime.base import Runner
from .mesh import Mesh
from .shard import gather_state

DEADLINE_EXIT_CODE = 3
DEADLINE_MARGIN_S = 10.0  # past the collective timeout: the collective's own error (clearer) normally comes first


class _Deadline:
    """A watchdog thread: `with deadline("step 3"):` must finish within `seconds`, else one error line and exit."""

    def __init__(self, seconds: float, rank: int):
        self.seconds, self.rank = seconds, rank
        self.armed: tuple | None = None
        threading.Thread(target=self._watch, daemon=True, name="mambadeploy-deadline").start()

    def __call__(self, what: str):
        self.what = what
        return self

    def __enter__(self):
        self.armed = (time.monotonic() + self.seconds, self.what)

    def __exit__(self, *exc):
        self.armed = None

    def _watch(self):
        while True:
            time.sleep(min(1.0, self.seconds / 4))
            armed = self.armed
            if armed is not None and time.monotonic() > armed[0]:
                print(f"error: rank {self.rank}: {armed[1]} made no progress for {self.seconds:g} s: another rank "
                      "died or hung; exiting", file=sys.stderr, flush=True)
                os._exit(DEADLINE_EXIT_CODE)


_DEADLINES: dict = {}


def _deadline(seconds: float, rank: int) -> _Deadline:
    """One watchdog thread per (timeout, rank) in a process, however many runners it builds (a worker reloads)."""
    if (seconds, rank) not in _DEADLINES:
        _DEADLINES[(seconds, rank)] = _Deadline(seconds, rank)
    return _DEADLINES[(seconds, rank)]


class GraphState:
    """A state whose decode step is a CUDA graph over its own buffers (advanced in place by step)."""

    def __init__(self, tensors: OrderedDict[str, torch.Tensor], batch: int):
        self.tensors, self.batch = tensors, batch
        self.tokens = self.logits = self.graph = None


class ParallelRunner(Runner):
    backend = "parallel"

    def __init__(self, model, mesh: Mesh, cuda_graph: bool = True, sync_steps: bool = True):
        """model: this rank's sharded model (parallel/load.load_sharded). sync_steps: wait for the GPU inside each
        call's deadline (so a hang inside a collective is caught); benchmarks turn it off."""
        self.model, self.mesh = model.eval(), mesh
        self.config = model.full_config
        self.device, self.dtype = model.device, model.dtype
        self.use_cuda_graph = cuda_graph and self.device.type == "cuda"
        self.sync_steps = sync_steps
        self.deadline = _deadline(mesh.timeout_s + DEADLINE_MARGIN_S, mesh.rank)
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        with self.deadline("startup"):
            self.devices = mesh.gather_object(name, "device names")

    def _done(self):
        if self.sync_steps and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def prefill(self, input_ids, lengths=None):
        self.mesh.where = "prefill"
        with self.deadline("prefill"):
            ids = input_ids.to(self.device)
            logits, state = self.model.prefill(ids, None if lengths is None else lengths.to(self.device))
            self._done()
        return logits, state

    @torch.no_grad()
    def step(self, token_ids, state):
        self.mesh.where = "decode step"
        tokens = token_ids.reshape(-1).to(self.device)
        with self.deadline("decode step"):
            if not self.use_cuda_graph:
                logits, new = self.model.step(tokens, state.tensors if isinstance(state, GraphState) else state)
                self._done()
                return logits, new
            st = state if isinstance(state, GraphState) else self._adopt(state)
            if tokens.numel() != st.batch:
                raise InputError(f"step got {tokens.numel()} token ids for a state of batch {st.batch}")
            self.model.check_ids(tokens)
            if "pos" in st.tensors and int(st.tensors["pos"].max()) >= self.config.max_seq_len:
                raise InputError(f"sequence reached the attention KV cache length ({self.config.max_seq_len})")
            if st.graph is None:
                self._capture(st, tokens)
            st.tokens.copy_(tokens)
            st.graph.replay()
            self._done()
        return st.logits.clone(), st

    def _adopt(self, state) -> GraphState:
        tensors = OrderedDict((k, v.clone()) for k, v in state.items())
        return GraphState(tensors, next(iter(tensors.values())).shape[0])

    def _capture(self, st: GraphState, tokens):
        """Warm up on a copy of the state (a side stream, as CUDA graphs require), then capture the step over st's
        buffers: the reference step (collectives inside) and the copies that advance the state in place."""
        st.tokens = tokens.clone()
        scratch = OrderedDict((k, v.clone()) for k, v in st.tensors.items())
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        self.mesh.capturing = True  # the MoE keeps to its shape-static mask dispatch
        try:
            with torch.cuda.stream(side):
                self.model.step(st.tokens, scratch, check=False)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits, new = self.model.step(st.tokens, st.tensors, check=False)
                for k, v in new.items():
                    st.tensors[k].copy_(v)
                st.logits = logits
        finally:
            self.mesh.capturing = False
        st.graph = graph

    def state_to_torch(self, state) -> dict:
        """The full single-process state, gathered from every rank (all ranks must call this)."""
        tensors = state.tensors if isinstance(state, GraphState) else state
        return gather_state(tensors, self.config, self.mesh)

    def synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def describe(self):
        return {"backend": self.backend, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "torch": torch.__version__, "mambadeploy": __version__, "cuda_graph": self.use_cuda_graph,
                **self.mesh.describe(), "devices": self.devices,
                "gpu": self.devices[0] if self.device.type == "cuda" else None}
