"""Build a Runner from what the user points at: a preset / checkpoint directory (torch backends), an export directory
(ORT) or an engine directory (TensorRT). Backends import lazily: a missing optional dependency raises
MissingDependencyError naming the install command, never an ImportError at CLI start."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MambaDeployError
from .base import Runner


@dataclass(frozen=True)
class Backend:
    description: str  # one line: the CLI and validate list these
    runs: str  # what it runs: "model" (a preset / checkpoint), "export" (ONNX graphs) or "engines" (TensorRT plans)
    gpu: bool = False  # needs a CUDA GPU (torch-fast also runs tiny models on the CPU through Triton's interpreter)
    validate: str | None = None  # in `validate`: "default" (run unless --backends says otherwise), "named" (only when
    #                              named: it starts worker processes), None (an alias there, resolved before)


# The one table of backend names: make_runner dispatches on it, validate derives its lists from it.
BACKENDS = {
    "torch": Backend("PyTorch eager reference (CPU or CUDA)", "model", validate="default"),
    "torch-fast": Backend("Triton kernels, decode step in a CUDA graph (CUDA; on CPU Triton's interpreter: tiny "
                          "models only)", "model", gpu=True, validate="default"),
    "ort-cpu": Backend("ONNX Runtime, CPU provider (= ort --provider cpu)", "export", validate="default"),
    "ort-cuda": Backend("ONNX Runtime, CUDA provider (= ort --provider cuda; needs onnxruntime-gpu)", "export",
                        gpu=True, validate="default"),
    "trt": Backend("TensorRT / TensorRT-RTX engines from `mambadeploy build` (CUDA GPU; not run on these machines)",
                   "engines", gpu=True, validate="default"),
    "ort": Backend("ONNX Runtime on an export directory (--provider cpu|cuda); a preset/checkpoint is exported first "
                   "(cached)", "export"),
    "parallel": Backend("tensor / expert parallel over torch.distributed (--parallel tp=N,ep=M): torchrun ranks, or "
                        "workers spawned here (gloo on CPU, NCCL on GPUs)", "model", validate="named"),
}
ONNX_BACKENDS = tuple(n for n, b in BACKENDS.items() if b.runs == "export" and b.validate)


def _load(target, dtype, device, max_context=None):
    """A preset / checkpoint, or an already-loaded MambaMoELM: that model itself when dtype and device match, else a
    copy of its weights in `dtype` on `device`. (validate builds every torch candidate from its reference's weights:
    a preset built again on another device would draw other random numbers.)"""
    from ..models.checkpoint import empty_model, load_model, parse_dtype
    from ..models.model import MambaMoELM

    if not isinstance(target, MambaMoELM):
        return load_model(target, dtype=dtype, device=device, max_context=max_context)
    if max_context is not None and max_context != target.config.max_seq_len:
        raise MambaDeployError("max_context applies when a model is loaded: pass it to load_model")
    dtype = parse_dtype(dtype)
    if target.dtype == dtype and str(target.device) == str(torch.device(device)):
        return target
    copy = empty_model(target.config, dtype, device)
    copy.load_state_dict(target.state_dict())
    copy.source = getattr(target, "source", None)
    return copy.eval()


def directory_kind(target) -> str | None:
    """"export" (an ONNX export directory), "engines" (a TensorRT engine directory) or None, from its manifest.json."""
    import json

    path = Path(str(target)) / "manifest.json"
    if isinstance(target, torch.nn.Module) or not path.is_file():
        return None
    try:
        fmt = json.loads(path.read_text()).get("format")
    except (json.JSONDecodeError, AttributeError):
        return "export"  # a broken manifest: the export reader says what is wrong with it
    from ..trt.engine_dir import FORMAT as ENGINE_FORMAT

    return "engines" if fmt == ENGINE_FORMAT else "export"


def _refuse_directory(target, backend: str) -> None:
    kind = directory_kind(target)
    wants = {"model": None}.get(BACKENDS[backend].runs, BACKENDS[backend].runs) if backend in BACKENDS else "export"
    if kind is None or kind == wants:
        return
    if kind == "engines":
        raise MambaDeployError(f"{target} is a TensorRT engine directory (made by mambadeploy build): run it with "
                               "--backend trt (inspect it with: mambadeploy inspect DIR)")
    raise MambaDeployError(f"{target} is an ONNX export directory: run it with --backend ort"
                           + (", or build engines from it first: mambadeploy build DIR --out ENGINES --target trt"
                              if backend == "trt" else ""))


def make_runner(target, backend: str = "torch", dtype="fp32", device="cpu", **options) -> Runner:
    """target: preset name, checkpoint directory, export directory or engine directory (per backend); the torch
    backends also take a loaded MambaMoELM."""
    if backend not in BACKENDS:
        raise MambaDeployError(f"unknown backend {backend!r}; backends: {', '.join(BACKENDS)}")
    _refuse_directory(target, backend)
    if backend == "torch":
        from .torch_eager import TorchEagerRunner

        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise MambaDeployError(f"device {device!r}: this torch ({torch.__version__}) sees no CUDA device")
        return TorchEagerRunner(_load(target, dtype, device, options.get("max_context")))
    if backend == "torch-fast":
        from .torch_fast import TorchFastRunner, check_device

        check_device(device)
        fast = {k: options[k] for k in ("prefill_chunk", "kv_dtype") if options.get(k) is not None}
        return TorchFastRunner(_load(target, dtype, device, options.get("max_context")),
                               use_cuda_graph=options.get("cuda_graph", True), **fast)
    if options.get("max_context") is not None:  # the graphs' and engines' KV inputs are sized when they are made
        raise MambaDeployError(f"--max-context sizes a model as it is loaded; backend {backend} runs an export "
                               "whose cache is fixed: export with `mambadeploy export MODEL --max-context N`")
    if backend == "trt":
        from .trt_runner import TrtRunner

        if not str(device).startswith("cuda"):
            raise MambaDeployError("backend trt runs on a CUDA GPU: use --device cuda")
        return TrtRunner(target, device=device, use_cuda_graph=options.get("cuda_graph", True))
    if backend == "parallel":
        from ..parallel.launch import make_parallel_runner

        return make_parallel_runner(target, options.get("parallel") or "tp=2", dtype, device,
                                    **{k: options[k] for k in ("timeout_s", "init", "seed", "cuda_graph", "kernels")
                                       if options.get(k) is not None})[0]
    if BACKENDS[backend].runs == "export":
        from .ort_runner import OrtRunner, default_ops, export_for

        provider = backend[4:] or options.get("provider") or ("cuda" if str(device).startswith("cuda") else "cpu")
        directory = export_for(target, dtype=dtype, ops=options.get("ops") or default_ops(provider))
        device_id = int(str(device).split(":")[1]) if str(device).startswith("cuda:") else 0
        # cuda_graph None: on for CUDA (the runner's default); prefill_chunk: needs an export with --prefill-state
        return OrtRunner.from_dir(directory, provider, device_id=device_id, cuda_graph=options.get("cuda_graph"),
                                  prefill_chunk=options.get("prefill_chunk") if (directory / "prefill_state.onnx")
                                  .is_file() else None)
    raise MambaDeployError(f"backend {backend!r} is registered but not wired into make_runner")
