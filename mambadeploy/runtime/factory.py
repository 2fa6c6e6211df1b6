"""Build a Runner from what the user points at: a preset / checkpoint directory (torch backends), an export directory
(ORT) or an engine directory (TensorRT). Backends import lazily: a missing optional dependency raises
MissingDependencyError naming the install command, never an ImportError at CLI start."""

from __future__ import annotations

from pathlib import Path

from ..errors import MambaDeployError
from .base import Runner

# backend name -> one-line description (validate and the CLI list these)
BACKENDS = {
    "torch": "PyTorch eager reference (CPU or CUDA)",
    "torch-fast": "Triton kernels, decode step in a CUDA graph (CUDA; on CPU Triton's interpreter: tiny models only)",
    "trt": "TensorRT / TensorRT-RTX engines from `mambadeploy build` (CUDA GPU; not run on these machines)",
    "ort": "ONNX Runtime on an export directory (--provider cpu|cuda); a preset/checkpoint is exported first (cached)",
    "ort-cpu": "ONNX Runtime, CPU provider (= ort --provider cpu)",
    "ort-cuda": "ONNX Runtime, CUDA provider (= ort --provider cuda; needs onnxruntime-gpu)",
}


def make_runner(target, backend: str = "torch", dtype="fp32", device="cpu", **options) -> Runner:
    """target: preset name, checkpoint directory, export directory or engine directory (per backend)."""
    if backend not in BACKENDS:
        raise MambaDeployError(f"unknown backend {backend!r}; backends: {', '.join(BACKENDS)}")
    if backend == "torch":
        from ..models.checkpoint import load_model
        from .torch_eager import TorchEagerRunner

        if isinstance(target, (str, Path)) and (Path(target) / "manifest.json").exists():
            raise MambaDeployError(f"{target} is an export directory: use --backend ort")
        import torch

        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise MambaDeployError(f"device {device!r}: this torch ({torch.__version__}) sees no CUDA device")
        return TorchEagerRunner(load_model(target, dtype=dtype, device=device))
    if backend == "torch-fast":
        from ..models.checkpoint import load_model
        from .torch_fast import TorchFastRunner, check_device

        check_device(device)
        return TorchFastRunner(load_model(target, dtype=dtype, device=device),
                               use_cuda_graph=options.get("cuda_graph", True))
    if backend == "trt":
        from .trt_runner import TrtRunner

        if not str(device).startswith("cuda"):
            raise MambaDeployError("backend trt runs on a CUDA GPU: use --device cuda")
        return TrtRunner(target, device=device, use_cuda_graph=options.get("cuda_graph", True))
    if backend in ("ort", "ort-cpu", "ort-cuda"):
        from .ort_runner import OrtRunner, export_for

        provider = backend[4:] or options.get("provider") or ("cuda" if str(device).startswith("cuda") else "cpu")
        directory = export_for(target, dtype=dtype, ops=options.get("ops"))
        device_id = int(str(device).split(":")[1]) if str(device).startswith("cuda:") else 0
        return OrtRunner.from_dir(directory, provider, device_id=device_id,
                                  cuda_graph=bool(options.get("cuda_graph", False)))
    raise MambaDeployError(f"backend {backend!r} is registered but not wired into make_runner")
