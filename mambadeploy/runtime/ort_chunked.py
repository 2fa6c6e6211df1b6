"""Chunked prefill through an export's `prefill_state.onnx` (export --prefill-state): a long prompt runs as chunks of
`chunk` tokens, each continuing the state the previous one returned (the first from an all-zero state, which the graph
treats as a fresh sequence), so the prompt's activations are those of one chunk. Left-padded rows stay right: a row's
real tokens in a chunk are `lengths - (L - stop)` clipped to the chunk (0 while the row is still in its padding).

A graph exported at batch 1 (its attention is GroupQueryAttention, which continues a cache at batch 1 only: see
export/gqa_prefill.py) takes the rows one after the other, each on its own real tokens (no padding).

The states stay torch tensors on the runner's device (never through the host), each row group's in its rows of the
final buffers — the CUDA-graph buffers when the runner has them, so decode continues from them as from a one-pass
prefill. A state the graph may update in place (its KV caches under GroupQueryAttention: ort_exports.aliased_states)
is bound as both input and output, so a chunk writes its slots instead of copying the whole cache; the others are
written to a scratch buffer and copied back (a few MB of Mamba state per chunk)."""

from __future__ import annotations

import numpy as np
import torch

from ..dtypes import TORCH_DTYPES
from ..errors import MambaDeployError
from ..models.state import PAST, PRESENT


def chunked_prefill(runner, ids: np.ndarray, lens: np.ndarray, chunk: int):
    """runner: an OrtRunner whose export has a prefill_state graph. Returns (last-position logits (B, V) fp32 torch,
    state tensors by name, the CUDA-graph targets written or None)."""
    sess = runner.session("prefill_state")
    B, L = ids.shape
    device = torch.device("cuda", runner.device_id) if runner.provider == "cuda" else torch.device("cpu")
    targets = runner.graph_buffers(B) if runner.cuda_graph else None
    if targets is not None:
        for t in targets.values():
            t.zero_()  # an all-zero state is a fresh sequence: the buffers may hold an earlier one
        final = dict(targets)
    else:
        final = {s.name: torch.zeros([B if d == "batch" else d for d in s.shape], dtype=TORCH_DTYPES[s.dtype],
                                     device=device) for s in runner.manifest.state}
    _sync(device)  # torch wrote the buffers on its stream; ORT reads them on its own
    in_place = runner.prefill_state_aliases
    if runner.gqa_prefill_state:  # a batch-1 graph: each row alone, on its real tokens only
        groups = [(b, b + 1, ids[b:b + 1, L - int(lens[b]):], lens[b:b + 1]) for b in range(B)]
    else:
        groups = [(0, B, ids, lens)]
    logits = [_run_group(runner, sess, {n: t[r0:r1] for n, t in final.items()}, group_ids, group_lens, chunk,
                         in_place) for r0, r1, group_ids, group_lens in groups]
    return torch.cat(logits), final, targets


def _run_group(runner, sess, state: dict, ids: np.ndarray, lens: np.ndarray, chunk: int, in_place: set):
    """Chunks of `ids` (rows of `state`, views updated in place) through the prefill_state session; returns the last
    chunk's logits."""
    scratch = {n: torch.empty_like(t) for n, t in state.items() if n not in in_place}
    L = ids.shape[1]
    for start in range(0, L, chunk):
        stop = min(start + chunk, L)
        real = np.clip(lens - (L - stop), 0, stop - start).astype(np.int64)
        if ids.shape[0] == 1 and real[0] != stop - start:  # the batch-1 GQA graph writes every token it is given
            raise MambaDeployError(f"internal: a batch-1 chunk of {stop - start} tokens with {real[0]} real ones")
        io = sess.io_binding()
        io.bind_cpu_input("input_ids", np.ascontiguousarray(ids[:, start:stop]))
        io.bind_cpu_input("lengths", real)
        io.bind_output("logits", "cpu")  # first: get_outputs() follows the binding order
        for name, value in state.items():
            runner.bind_tensor(io, "input", PAST + name, value)
            runner.bind_tensor(io, "output", PRESENT + name, value if name in in_place else scratch[name])
        runner.run(sess, io, "prefill_state")  # returns once ORT's stream is done
        for name, value in scratch.items():
            state[name].copy_(value)
        _sync(next(iter(state.values())).device)
    return torch.from_numpy(io.get_outputs()[0].numpy())


def _sync(device) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()

