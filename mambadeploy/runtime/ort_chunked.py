"""Chunked prefill through an export's `prefill_state.onnx` (export --prefill-state): a long prompt runs as chunks of
`chunk` tokens, each continuing the state the previous one returned (the first from an all-zero state, which the graph
treats as a fresh sequence), so the prompt's activations are those of one chunk. Left-padded rows stay right: a row's
real tokens in a chunk are `lengths - (L - stop)` clipped to the chunk (0 while the row is still in its padding).

The states move between chunks as OrtValues on the runner's device (never through the host); the last chunk writes
into the CUDA-graph buffers when the runner has them, so decode continues from it as from a one-pass prefill."""

from __future__ import annotations

import numpy as np
import torch

from ..dtypes import TORCH_DTYPES
from ..models.state import PAST, PRESENT


def chunked_prefill(runner, ids: np.ndarray, lens: np.ndarray, chunk: int):
    """runner: an OrtRunner whose export has a prefill_state graph. Returns (last-position logits (B, V) fp32 torch,
    state values by name, the CUDA-graph targets written or None)."""
    sess = runner.session("prefill_state")
    B, L = ids.shape
    device = torch.device("cuda", runner.device_id) if runner.provider == "cuda" else torch.device("cpu")
    values = {s.name: torch.zeros([B if d == "batch" else d for d in s.shape], dtype=TORCH_DTYPES[s.dtype],
                                  device=device) for s in runner.manifest.state}
    targets = None
    for start in range(0, L, chunk):
        stop = min(start + chunk, L)
        real = np.clip(lens - (L - stop), 0, stop - start).astype(np.int64)
        io = sess.io_binding()
        io.bind_cpu_input("input_ids", np.ascontiguousarray(ids[:, start:stop]))
        io.bind_cpu_input("lengths", real)
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                runner.bind_tensor(io, "input", PAST + name, value)
            else:
                io.bind_ortvalue_input(PAST + name, value)
        io.bind_output("logits", "cpu")
        if stop == L and runner.cuda_graph:
            targets = runner.graph_buffers(B)
            for name in runner.state_names:
                runner.bind_tensor(io, "output", PRESENT + name, targets[name])
        else:
            for name in runner.state_names:
                io.bind_output(PRESENT + name, runner.provider, runner.device_id)
        runner.run(sess, io, "prefill_state")
        outs = io.get_outputs()
        if targets is None:
            values = dict(zip(runner.state_names, outs[1:]))
    return torch.from_numpy(outs[0].numpy()), (dict(targets) if targets is not None else values), targets
