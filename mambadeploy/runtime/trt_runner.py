"""TensorRT runner: prefill and decode engines behind the Runner interface, written against the TensorRT 10 Python API.

States live in device buffers: prefill writes `present.*` into one set, each decode step reads `past.*` from one set and
writes `present.*` into the other (two sets per batch size, swapped every step: no host round trips, no allocation per
step), except the KV caches of a custom export, one buffer in both sets (`aliased_states`). The decode step is captured once per (batch, parity) into a CUDA graph and replayed; TensorRT permits capturing
enqueueV3 once shapes and addresses are fixed (our plugins' enqueue only launches kernels, no host syncs).

NOT RUN ANYWHERE YET: full TensorRT cannot be installed on these machines and TensorRT-RTX refuses to run plans on the
H100 (sm_90). Everything before TensorRT is touched (manifest, checksums, compatibility, profile limits) is unit-tested;
the engine execution path is written, not verified. Errors say so.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from ..errors import InputError, MambaDeployError
from ..models.config import ModelConfig
from ..models.state import PAST, PRESENT
from ..plugins import trt_lib, trt_v3
from ..trt import engine_dir as ed
from ..trt import fingerprint as fp
from ..trt import profiles as pr
from .base import Runner

TORCH_OF_TRT = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                "INT64": torch.int64, "BOOL": torch.bool}


class TrtRunner(Runner):
    backend = "trt"

    def __init__(self, engine_dir, device: str = "cuda", use_cuda_graph: bool = True):
        self.engine_dir = Path(engine_dir)
        self.manifest = ed.read_manifest(self.engine_dir)
        self.target = self.manifest["target"]
        self.hint = self.manifest.get("build_command", "mambadeploy build EXPORT_DIR --out ENGINE_DIR")
        export = self.manifest.get("export_manifest") or {}
        if "config" not in export:
            raise MambaDeployError(f"{self.engine_dir}/manifest.json lacks the export's model config; rebuild with: "
                                   f"{self.hint}")
        self.config = ModelConfig.from_dict(export["config"])
        blobs = {g: ed.load_engine_bytes(self.engine_dir, self.manifest, g) for g in ed.GRAPHS}  # checksums first
        if not torch.cuda.is_available():
            raise MambaDeployError("the TensorRT runner needs a CUDA GPU and none is visible")
        self.trt = trt_lib.import_trt(self.target)
        trt_lib.require_plugin_safe_process(self.target)
        now = {"trt": {"target": self.target, "version": trt_lib.version_of(self.trt)}, "gpu": self._gpu(),
               "plugins": fp.plugin_versions()}
        for g in ed.GRAPHS:
            built = self.manifest["engines"][g]["built_from"]
            ed.check_compatible(self.manifest, g, dict(built, **now))
        trt_v3.register_plugins(self.trt)
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(self.logger)
        self.engines, self.contexts = {}, {}
        for g, blob in blobs.items():
            engine = self.runtime.deserialize_cuda_engine(blob)
            if engine is None:
                raise MambaDeployError(f"TensorRT could not deserialize {ed.engine_path(self.engine_dir, g)} (corrupt, or "
                                       f"built by another TensorRT); rebuild with: {self.hint} --force")
            self.engines[g] = engine
            self.contexts[g] = engine.create_execution_context()
        self.profiles = {g: {k: tuple(map(tuple, v)) for k, v in
                             self.manifest["engines"][g]["built_from"]["flags"]["profile"].items()} for g in ed.GRAPHS}
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)
        self.use_cuda_graph = use_cuda_graph
        self._graphs = {}  # (batch, parity) -> (CUDAGraph, logits buffer)
        self._buffers = {}  # batch -> [state set 0, state set 1]
        self.aliased_states = aliased_states(export, self.config)

    def _gpu(self) -> str:
        if self.target == "rtx":
            return self.manifest["gpu"]  # RTX plans carry their compute-capability list; the runtime checks the GPU
        major, minor = torch.cuda.get_device_capability()
        return f"{torch.cuda.get_device_name()} sm_{major}{minor}"

    # ------------------------------------------------------------------ io helpers
    def _io(self, graph: str):
        engine = self.engines[graph]
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        return engine, inputs, outputs

    def _dtype(self, engine, name):
        return TORCH_OF_TRT[str(engine.get_tensor_dtype(name)).split(".")[-1]]

    def _run(self, graph: str, feeds: dict, out_buffers: dict | None = None) -> dict:
        pr.check_within(self.profiles[graph], {k: tuple(v.shape) for k, v in feeds.items()}, self.hint)
        engine, inputs, outputs = self._io(graph)
        ctx = self.contexts[graph]
        for name in inputs:
            t = feeds[name]
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        results = {}
        for name in outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            buf = (out_buffers or {}).get(name)
            if buf is None or tuple(buf.shape) != shape:
                buf = torch.empty(shape, dtype=self._dtype(engine, name), device=self.device)
            ctx.set_tensor_address(name, buf.data_ptr())
            results[name] = buf
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise MambaDeployError(f"TensorRT failed to run the {graph} engine (see the log above)")
        return results

    # ------------------------------------------------------------------ Runner
    def prefill(self, input_ids, lengths=None):
        ids = input_ids.to(self.device, torch.int64).contiguous()
        B, L = ids.shape
        if L == 0:
            raise InputError("empty prompt")
        lengths = torch.full((B,), L, dtype=torch.int64) if lengths is None else lengths
        feeds = {"input_ids": ids, "lengths": lengths.to(self.device, torch.int64).contiguous()}
        with torch.cuda.stream(self.stream):
            out = self._run("prefill", feeds, self._state_set(B, 0, prefix=PRESENT))
        self.stream.synchronize()
        state = OrderedDict((k[len(PRESENT):], v) for k, v in out.items() if k.startswith(PRESENT))
        return out["logits"].float(), state

    def step(self, token_ids, state):
        ids = token_ids.to(self.device, torch.int64).reshape(-1, 1).contiguous()
        B = ids.shape[0]
        self._state_set(B, 0, prefix=PRESENT)  # make sure both buffer sets exist
        sets = self._buffers[B]
        if _same_buffers(state, sets[0]):
            parity = 0
        elif _same_buffers(state, sets[1]):
            parity = 1
        else:  # a state from elsewhere (another runner, a test): copy it into set 0 once, then alternate
            for k, v in sets[0].items():
                v.copy_(state[k])
            parity, state = 0, sets[0]
        out_set = self._state_set(B, 1 - parity, prefix=PRESENT)
        feeds = {"input_ids": ids, **{PAST + k: v for k, v in state.items()}}
        if not self.use_cuda_graph:
            with torch.cuda.stream(self.stream):
                out = self._run("decode", feeds, out_set)
            self.stream.synchronize()
        else:
            out = self._replay(B, parity, feeds, out_set)
        new_state = OrderedDict((k[len(PRESENT):], v) for k, v in out.items() if k.startswith(PRESENT))
        return out["logits"].float(), new_state

    def _replay(self, B, parity, feeds, out_set):
        key = (B, parity)
        if key not in self._graphs:
            ids = torch.empty_like(feeds["input_ids"])
            static = dict(feeds, input_ids=ids)
            with torch.cuda.stream(self.stream):
                self._run("decode", static, out_set)  # warm-up run (plugins load, shapes settle) before capture
            self.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                out = self._run("decode", static, out_set)
            self._graphs[key] = (graph, ids, out)
        graph, ids, out = self._graphs[key]
        ids.copy_(feeds["input_ids"])
        graph.replay()
        self.stream.synchronize()
        return out

    def _state_set(self, B, parity, prefix):
        """Preallocated present.* buffers for batch B, set `parity` (two sets alternate across decode steps)."""
        if B not in self._buffers:
            engine, _, outputs = self._io("decode")
            sets = []
            for _ in range(2):
                bufs = {}
                for name in outputs:
                    if name.startswith(PRESENT):
                        shape = (B,) + tuple(engine.get_tensor_shape(name))[1:]
                        bufs[name[len(PRESENT):]] = torch.zeros(shape, dtype=self._dtype(engine, name), device=self.device)
                sets.append(bufs)
            for name in self.aliased_states:  # one buffer in both sets: the plugin writes one slot in place
                sets[1][name] = sets[0][name]
            self._buffers[B] = sets
        return {prefix + k: v for k, v in self._buffers[B][parity].items()}

    def describe(self) -> dict:
        return {"backend": "trt", "target": self.target, "device": torch.cuda.get_device_name(),
                "trt_version": trt_lib.version_of(self.trt), "engine_dir": str(self.engine_dir),
                "cuda_graph": self.use_cuda_graph}

    def synchronize(self) -> None:
        self.stream.synchronize()


def aliased_states(export_manifest: dict, config: ModelConfig) -> set:
    """The decode states whose present.* may share past.*'s buffer: the KV caches of an engine built from a `--ops
    custom` export, where each attention layer is one DecodeAttention plugin that declares present aliasing past
    (get_aliased_input). The runner then keeps ONE buffer for them in both ping-pong sets, so a step writes one KV slot
    instead of the plugin copying the whole cache (what ORT's runner does, runtime/ort_exports.aliased_states)."""
    if export_manifest.get("ops") != "custom":
        return set()
    return {f"L{i}.{part}" for i, layer in enumerate(config.layers) if layer.mixer == "attention"
            for part in ("key", "value")}


def _same_buffers(state: dict, bufs: dict) -> bool:
    return bool(bufs) and all(k in state and state[k].data_ptr() == v.data_ptr() for k, v in bufs.items())
