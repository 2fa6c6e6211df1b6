"""ONNX Runtime backend: drives an export directory (manifest.json + prefill.onnx + decode.onnx) behind the Runner
interface. The recurrent state lives in OrtValues bound through IO binding: on CUDA the states stay on the GPU from
prefill through every decode step; only token ids go up and logits come down.

CUDA-graph mode (the default on CUDA; `cuda_graph=False` turns it off): the decode step is captured once per batch size
and replayed. On the H100 it gave the same logits as plain runs (max difference 0.0) at 3.8 vs 11.0 ms per step for the
blackmamba-1.5b shape at batch 1 (results/archive/bench_ort_h100.json). Capture needs fixed buffers, so states
ping-pong between two preallocated sets and a state object is valid until the step after next (a stale state is
refused, never silently read). The fixed buffers are torch CUDA tensors bound to ORT by address (any dtype, bf16
included): the states never leave the GPU and are never copied, token ids go up as B integers, and the logits stay on
the GPU (a torch tensor, as torch-fast returns them).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..dtypes import TORCH_DTYPES
from ..errors import InputError, MambaDeployError, lazy_import
from ..export.manifest import Manifest, ManifestError
from ..models.state import PAST, PRESENT
from .base import PREFILL_CHUNK_DEFAULT, Runner
from .ort_exports import _exporter_hash, aliased_states, default_ops, export_for, missing_kernel_hint  # noqa: F401  (their home before; callers import here)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "bfloat16": "tensor(bfloat16)",
             "int64": "tensor(int64)", "int32": "tensor(int32)"}
# IO binding by address takes a numpy type, or an ONNX type number where numpy has none (bf16)
REFERENCE_SCORE_LIMIT = 1 << 31  # elements of the prefill graph's score tensor (see OrtRunner._scores_too_big)
_ELEMENT_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.bfloat16: 16}


def _ort():
    return lazy_import("onnxruntime", "onnxruntime", extra="onnx", why="the ONNX Runtime backend (--backend ort)")


@dataclass
class OrtState:
    """The recurrent state of one batch as OrtValues (by state name, manifest order), plus host-side bookkeeping."""

    values: dict
    batch: int
    tokens: int  # longest row's token count so far (prompt + generated): checked against the KV-cache length
    owner: int  # id of the runner that made it
    slot: tuple | None = None  # CUDA-graph mode: (batch, buffer set, write epoch)


class OrtRunner(Runner):
    backend = "ort"
    _instances = itertools.count()

    def __init__(self, directory, provider: str = "cpu", device_id: int = 0, cuda_graph: bool | None = None,
                 threads: int | None = None, check_hashes: bool = True, aot_kernels: bool = True,
                 prefill_chunk: int | None = None, share_weights: bool = False):
        """prefill_chunk: prompt tokens per prefill chunk (None: PREFILL_CHUNK_DEFAULT when the export has the batch-1
        GroupQueryAttention prefill_state graph, else one pass). share_weights: one copy of the external weights for
        all sessions (runtime/ort_weights.py); opt-in until its device path has run on a GPU and its memory saving has
        been measured."""
        ort = _ort()
        self.directory = Path(directory)
        if provider not in PROVIDERS:
            raise MambaDeployError(f"unknown ONNX Runtime provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
        if cuda_graph and provider != "cuda":
            raise MambaDeployError("CUDA-graph mode needs --provider cuda")
        self.manifest = Manifest.read(self.directory)
        self.manifest.check_files(self.directory, hash_graphs=check_hashes)
        if cuda_graph is None:  # default: on for CUDA (the fixed buffers are torch CUDA tensors)
            cuda_graph = provider == "cuda" and torch.cuda.is_available()
        if cuda_graph and not torch.cuda.is_available():
            raise MambaDeployError("CUDA-graph mode keeps its buffers in torch CUDA tensors: install a CUDA build of "
                                   "torch, or pass cuda_graph=False")
        self.config = self.manifest.model_config
        self.provider, self.device_id, self.cuda_graph = provider, device_id, cuda_graph
        self.id = next(self._instances)
        self.state_names = [s.name for s in self.manifest.state]
        self.limits = self.manifest.limits
        if provider == "cuda":
            if hasattr(ort, "preload_dlls"):
                ort.preload_dlls()  # onnxruntime-gpu finds the CUDA / cuDNN libraries of the installed wheels
            if PROVIDERS["cuda"] not in ort.get_available_providers():
                raise MambaDeployError("the CUDA provider is not available in this onnxruntime "
                                       f"({ort.__version__}: {', '.join(ort.get_available_providers())}); install "
                                       "onnxruntime-gpu: pip install 'mambadeploy[gpu]'")
        if prefill_chunk is None and self.gqa_prefill_state:  # long prompts need it: never the (L x L) reference
            prefill_chunk = PREFILL_CHUNK_DEFAULT
        if prefill_chunk is not None:  # chunked prefill needs the graph that continues an incoming state
            if int(prefill_chunk) < 1:
                raise MambaDeployError(f"prefill chunk must be at least 1 token, got {prefill_chunk}")
            if "prefill_state" not in self.manifest.graphs:
                raise MambaDeployError(f"{self.directory} has no prefill_state.onnx: export it with --prefill-state "
                                       "to prefill in chunks")
        self.prefill_chunk, self._threads = prefill_chunk, threads
        self._library = None  # the custom-op library the sessions loaded (custom exports)
        external = any(g.external_data for g in self.manifest.graphs.values())
        self.shared_weights = None
        if share_weights and external:
            from .ort_weights import SharedWeights

            self.shared_weights = SharedWeights(self.directory, "cuda" if provider == "cuda" else "cpu", device_id)
        self.sessions = {name: self._session(ort, name, threads) for name in ("prefill", "decode")}
        self.aot = self._install_aot(aot_kernels) if provider == "cuda" and self._library else None
        for name, sess in self.sessions.items():
            self._check_io(name, sess)
        self._device = "cuda" if provider == "cuda" else "cpu"
        self.aliased_states = aliased_states(self.directory / self.manifest.graphs["decode"].file)
        self._graph_sets: dict = {}  # CUDA-graph buffers per batch size
        self._bindings: dict = {}  # CUDA-graph IO bindings per (batch size, buffer set written)
        self._epochs: dict = {}

    @classmethod
    def from_dir(cls, directory, provider: str = "cpu", **options) -> OrtRunner:
        return cls(directory, provider, **options)

    # ------------------------------------------------------------------ sessions
    def _session(self, ort, graph: str, threads):
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        providers = [PROVIDERS["cpu"]]
        if self.provider == "cuda":
            cuda = {"device_id": str(self.device_id), "cudnn_conv_algo_search": "HEURISTIC",
                    # fp32 exports are compared with the fp32 reference: no TF32 rounding in MatMul / Conv
                    "use_tf32": "0" if self.manifest.dtype == "float32" else "1"}
            if self.cuda_graph and graph == "decode":
                cuda["enable_cuda_graph"] = "1"
            providers = [(PROVIDERS["cuda"], cuda), PROVIDERS["cpu"]]
        if self.manifest.ops == "custom":  # mambadeploy-domain nodes: our kernel library (built once, cached)
            from ..plugins.ort.build import register

            self._library = register(opts, cuda=self.provider == "cuda")
        path = self.directory / self.manifest.graphs[graph].file
        if self.shared_weights is not None:
            self.shared_weights.add_to(opts, path)
        try:
            session = ort.InferenceSession(str(path), opts, providers=providers)
            session.mambadeploy_weights = self.shared_weights  # ORT reads them in place: they live as long as it does
            return session
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            hint = missing_kernel_hint(str(exc), self.provider, self.manifest)
            raise MambaDeployError(f"ONNX Runtime cannot load {path}: {exc}{hint}") from exc

    def _install_aot(self, on: bool) -> dict:
        """One kernel source: register torch-fast's Triton kernels (compiled ahead of time for this GPU) with the
        library, whose scan and MoE ops then launch them instead of their hand-written CUDA kernels. The switch is
        process-wide (the library is loaded once per process): the last runner made decides."""
        from ..plugins.ort import aot_table

        if not on:
            aot_table.enable(self._library, False)
            return {"on": False}
        try:
            lazy_import("triton", "triton", "gpu", "the ORT library's Triton kernels (aot_kernels=False: without them)")
        except MambaDeployError as exc:  # no Triton: the library's hand-written CUDA kernels run
            aot_table.enable(self._library, False)
            return {"on": False, "why": str(exc)}
        specs = aot_table.plan_for(self.directory)
        with torch.cuda.device(self.device_id):
            torch.zeros(1, device="cuda")  # the device's primary context current here: modules load now, not in a capture
            kernels = aot_table.compile_plan(specs)
            aot_table.install(self._library, kernels)
        aot_table.enable(self._library, True)
        return {"on": True, "kernels": len(kernels), "plan": aot_table.plan_digest(specs)}

    def aot_stats(self, reset: bool = False) -> dict | None:
        """AOT launches and fallbacks since the last reset (None: not a CUDA session of a custom export)."""
        if self.aot is None:
            return None
        from ..plugins.ort import aot_table

        return aot_table.stats(self._library, reset)

    def session(self, graph: str):
        """The session of one of the export's graphs (prefill_state: made on first use, checked like the others)."""
        if graph not in self.sessions:
            self.sessions[graph] = self._session(_ort(), graph, self._threads)
            self._check_io(graph, self.sessions[graph])
        return self.sessions[graph]

    def _check_io(self, graph: str, sess) -> None:
        """The session's inputs and outputs must be what the manifest says, in order."""
        entry = self.manifest.graphs[graph]
        for kind, actual, expected in (("input", sess.get_inputs(), entry.inputs),
                                       ("output", sess.get_outputs(), entry.outputs)):
            got = [(a.name, a.type) for a in actual]
            want = [(e.name, ORT_TYPES.get(e.dtype, e.dtype)) for e in expected]
            if got != want:
                raise ManifestError(f"{entry.file}: {kind}s {got} do not match the manifest {want}; "
                                    "the graph was replaced or the manifest edited: re-export")
            for a, e in zip(actual, expected):
                static = [(i, d) for i, d in enumerate(e.shape) if isinstance(d, int)]
                if len(a.shape) != len(e.shape) or any(a.shape[i] != d for i, d in static):
                    raise ManifestError(f"{entry.file}: {kind} {a.name} has shape {a.shape}, manifest says {e.shape}")
        want_state = [PRESENT + n for n in self.state_names]
        if [o.name for o in entry.outputs[1:]] != want_state:
            raise ManifestError(f"{entry.file}: state outputs do not follow the manifest's state list")

    # ------------------------------------------------------------------ input checks
    def _ids(self, ids, what: str, ndim: int) -> np.ndarray:
        t = torch.as_tensor(ids)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise InputError(f"{what} must be integer token ids, got dtype {t.dtype}")
        if t.dim() != ndim:
            raise InputError(f"{what} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
        t = t.to(torch.int64).cpu()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.config.vocab_size):
            bad = t[(t < 0) | (t >= self.config.vocab_size)].unique().tolist()[:5]
            raise InputError(f"token id(s) {bad} outside the vocabulary [0, {self.config.vocab_size})")
        return t.numpy()

    def _check_batch(self, batch: int) -> None:
        if batch < 1:
            raise InputError("empty batch")
        if batch > self.limits["max_batch"]:
            raise InputError(f"batch of {batch} exceeds the export's max batch {self.limits['max_batch']} "
                             "(re-export with a larger --max-batch)")

    @property
    def max_length(self):
        return self.limits.get("max_length")

    # ------------------------------------------------------------------ prefill / step
    def prefill(self, input_ids, lengths=None):
        ids = self._ids(input_ids, "input_ids", 2)
        B, L = ids.shape
        if L == 0:
            raise InputError("empty prompt: give at least one token")
        self._check_batch(B)
        if self.max_length is not None and L > self.max_length:
            raise InputError(f"prompt of {L} tokens is longer than the attention KV cache ({self.max_length} slots)")
        if lengths is None:
            lens = np.full((B,), L, dtype=np.int64)
        else:
            lt = torch.as_tensor(lengths)
            if lt.is_floating_point() or tuple(lt.shape) != (B,):
                raise InputError(f"lengths must be {B} integers (one per row), got {tuple(lt.shape)} {lt.dtype}")
            lens = lt.to(torch.int64).cpu().numpy()
            if lens.min() < 1 or lens.max() > L:
                raise InputError(f"prompt lengths must be in [1, {L}], got {lens.tolist()}")
        if self.prefill_chunk is not None and (L > self.prefill_chunk or self._scores_too_big(B, L)):
            from .ort_chunked import chunked_prefill

            logits, values, targets = chunked_prefill(self, ids, lens, self.prefill_chunk)
            slot = self._prefill_epoch(B) if targets is not None else None
            return logits, OrtState(values, B, int(L), self.id, slot)
        sess = self.sessions["prefill"]
        io = sess.io_binding()
        io.bind_cpu_input("input_ids", np.ascontiguousarray(ids))
        io.bind_cpu_input("lengths", lens)
        io.bind_output("logits", "cpu")
        targets = self._graph_buffers(B, 0) if self.cuda_graph else None
        for n in self.state_names:
            if targets is not None:
                self.bind_tensor(io, "output", PRESENT + n, targets[n])
            else:
                io.bind_output(PRESENT + n, self._device, self.device_id)
        self._run(sess, io)
        outs = io.get_outputs()
        logits = torch.from_numpy(outs[0].numpy())
        values = dict(targets) if targets is not None else dict(zip(self.state_names, outs[1:]))
        slot = self._prefill_epoch(B) if self.cuda_graph else None
        return logits, OrtState(values, B, int(L), self.id, slot)

    def _scores_too_big(self, batch: int, length: int) -> bool:
        """Whether the prefill graph's reference attention would hold a (B, heads, L, L) score tensor of 2^31 elements
        or more (ORT's CUDA kernels index with int32: at Jamba's 32 heads a single 8,192-token prompt is there): such
        a prompt takes the chunked GroupQueryAttention graph even when it fits in one chunk."""
        a = self.config.attention
        return (a is not None and self.gqa_prefill_state and
                batch * a.n_heads * length * length >= REFERENCE_SCORE_LIMIT)

    @functools.cached_property
    def prefill_state_aliases(self) -> set:
        """The prefill_state graph's states that may be updated in place (its GroupQueryAttention KV caches)."""
        return aliased_states(self.directory / self.manifest.graphs["prefill_state"].file)

    @property
    def gqa_prefill_state(self) -> bool:
        """Whether the export's prefill_state graph is the batch-1 GroupQueryAttention one (export/gqa_prefill.py):
        its attention holds no score matrix; the reference's would hold a bigger one than the one-pass prefill."""
        entry = self.manifest.graphs.get("prefill_state")
        return entry is not None and entry.inputs[0].shape[0] == 1

    def step(self, token_ids, state: OrtState):
        self._check_state(state)
        t = torch.as_tensor(token_ids)
        tok = self._ids(t.reshape(-1) if t.dim() == 2 and t.shape[1] == 1 else t, "token_ids", 1)
        if tok.shape[0] != state.batch:
            raise InputError(f"token_ids has {tok.shape[0]} rows but the state holds a batch of {state.batch}")
        if self.max_length is not None and state.tokens >= self.max_length:
            raise InputError(f"sequence reached the attention KV cache length ({self.max_length})")
        if self.cuda_graph:
            return self._step_graph(tok, state)
        sess = self.sessions["decode"]
        io = sess.io_binding()
        io.bind_cpu_input("input_ids", tok.reshape(-1, 1))
        for n in self.state_names:  # OrtValues, or torch tensors where a chunked prefill left them
            self._bind_value(io, "input", PAST + n, state.values[n])
        io.bind_output("logits", "cpu")
        for n in self.state_names:
            if n in self.aliased_states:  # the op writes one slot of the cache in place (see aliased_states)
                self._bind_value(io, "output", PRESENT + n, state.values[n])
            else:
                io.bind_output(PRESENT + n, self._device, self.device_id)
        self._run(sess, io)
        outs = io.get_outputs()
        values = dict(zip(self.state_names, outs[1:]))
        for n in self.aliased_states:  # an OrtValue bound over a torch tensor does not own it: keep the tensor
            if isinstance(state.values[n], torch.Tensor):
                values[n] = state.values[n]
        return torch.from_numpy(outs[0].numpy()), OrtState(values, state.batch, state.tokens + 1, self.id)

    def _run(self, sess, io, run_options=None) -> None:
        self.run(sess, io, "prefill" if sess is self.sessions["prefill"] else "decode", run_options)

    def run(self, sess, io, graph: str, run_options=None) -> None:
        try:
            sess.run_with_iobinding(io, run_options)
        except Exception as exc:  # ORT's own exception types; surface as one line naming the graph
            raise MambaDeployError(f"ONNX Runtime failed running {graph} ({self.directory}): {exc}") from exc

    def _check_state(self, state) -> None:
        if not isinstance(state, OrtState) or state.owner != self.id:
            raise InputError("state must come from this runner's prefill/step")
        if state.slot is not None:
            batch, which, epoch = state.slot
            if self._epochs.get((batch, which)) != epoch:
                raise InputError("stale state: in CUDA-graph mode a state is valid only until the step after next")

    # ------------------------------------------------------------------ CUDA graph mode
    def _graph_buffers(self, batch: int, which: int) -> dict:
        """Preallocated torch CUDA buffers for (batch, buffer set 0/1): input ids, logits and both state sets. The
        aliased states (DecodeAttention's KV caches, `aliased_states`) are ONE buffer in both sets: the ping-pong then
        binds present to past and the op writes one slot in place (the pattern onnxruntime-genai uses for GQA with CUDA
        graphs) instead of copying the cache every step."""
        if batch not in self._graph_sets:
            device = torch.device("cuda", self.device_id)

            def alloc(shape, dtype):
                return torch.zeros(shape, dtype=TORCH_DTYPES[dtype], device=device)

            sets = [{s.name: alloc([batch if d == "batch" else d for d in s.shape], s.dtype) for s in self.manifest.state}
                    for _ in range(2)]
            for name in self.aliased_states:
                sets[1][name] = sets[0][name]
            self._graph_sets[batch] = {"states": sets, "ids": alloc([batch, 1], "int64"),
                                       "logits": alloc([batch, self.config.vocab_size], "float32")}
        return self._graph_sets[batch]["states"][which]

    def _bind_value(self, io, kind: str, name: str, value) -> None:
        if isinstance(value, torch.Tensor):
            self.bind_tensor(io, kind, name, value)
        elif kind == "input":
            io.bind_ortvalue_input(name, value)
        else:
            io.bind_ortvalue_output(name, value)

    def bind_tensor(self, io, kind: str, name: str, tensor: torch.Tensor) -> None:
        """Bind a contiguous torch tensor (CUDA or CPU) to a graph input or output by its address (no copy)."""
        bind = io.bind_input if kind == "input" else io.bind_output
        device = "cuda" if tensor.is_cuda else "cpu"
        bind(name, device, self.device_id if tensor.is_cuda else 0, _ELEMENT_TYPES[tensor.dtype], list(tensor.shape),
             tensor.data_ptr())


    def graph_buffers(self, batch: int) -> dict:
        """The CUDA-graph state buffers a prefill writes (set 0 of the ping-pong pair for this batch size)."""
        return self._graph_buffers(batch, 0)

    def _advance_epoch(self, batch, which):
        key = (batch, which)
        self._epochs[key] = self._epochs.get(key, 0) + 1
        return (batch, which, self._epochs[key])

    def _prefill_epoch(self, batch):
        """A prefill writes set 0; when the KV caches are one buffer in both sets (aliased_states) it also overwrote
        the caches of a state still in set 1, which must then be refused as stale too."""
        if self.aliased_states:
            self._advance_epoch(batch, 1)
        return self._advance_epoch(batch, 0)

    def _step_graph(self, tok: np.ndarray, state: OrtState):
        B = state.batch
        dst = 1 - state.slot[1]
        bufs = self._graph_sets[B]
        bufs["ids"].copy_(torch.from_numpy(tok).view(B, 1))
        torch.cuda.current_stream(bufs["ids"].device).synchronize()  # ORT reads the ids on its own stream
        io, opts = self._graph_binding(B, dst)
        self._run(self.sessions["decode"], io, opts)  # returns once ORT's stream is done: the buffers are ready
        return (bufs["logits"].clone(),
                OrtState(dict(bufs["states"][dst]), B, state.tokens + 1, self.id, self._advance_epoch(B, dst)))

    def _graph_binding(self, B: int, dst: int):
        """The decode IO binding reading buffer set 1 - dst and writing set dst, made once and reused: the buffers
        never move, and binding ~2 tensors per layer from Python on every step costs more than the captured step."""
        key = (B, dst)
        if key not in self._bindings:
            ort = _ort()
            bufs = self._graph_sets[B]
            io = self.sessions["decode"].io_binding()
            self.bind_tensor(io, "input", "input_ids", bufs["ids"])
            for n in self.state_names:
                self.bind_tensor(io, "input", PAST + n, bufs["states"][1 - dst][n])
            self.bind_tensor(io, "output", "logits", bufs["logits"])
            for n in self.state_names:
                self.bind_tensor(io, "output", PRESENT + n, bufs["states"][dst][n])
            opts = ort.RunOptions()
            # one captured graph per (batch size, direction of the ping-pong): ids must be positive
            opts.add_run_config_entry("gpu_graph_id", str(1 + 2 * (B - 1) + dst))
            self._bindings[key] = (io, opts)
        return self._bindings[key]

    # ------------------------------------------------------------------ the rest of the Runner interface
    def state_to_torch(self, state: OrtState) -> dict:
        self._check_state(state)
        return {n: _to_torch(v) for n, v in state.values.items()}

    def synchronize(self) -> None:
        """IO-bound runs return when their outputs are ready (logits come back to the host every step)."""

    def describe(self) -> dict:
        ort = _ort()
        m = self.manifest
        gpu = None
        if self.provider == "cuda" and torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(self.device_id)
        return {"backend": f"ort-{self.provider}", "provider": PROVIDERS[self.provider],
                "device": f"cuda:{self.device_id}" if self.provider == "cuda" else "cpu", "dtype": m.dtype,
                "ops": m.ops, "opset": m.opset, "cuda_graph": self.cuda_graph, "export_dir": str(self.directory),
                "onnxruntime": ort.__version__, "mambadeploy": __version__, "gpu": gpu, "aot_kernels": self.aot}


def _to_torch(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):  # CUDA-graph mode: the state lives in the runner's own torch buffers
        return value
    if value.data_type() == "tensor(bfloat16)":
        # numpy has no bf16: reinterpret the raw 16-bit words
        raw = value.numpy()
        return torch.from_numpy(np.ascontiguousarray(raw).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(value.numpy())
