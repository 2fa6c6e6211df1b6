"""Which backends validate can run here, and why the others cannot.

A backend request is `name[:dtype]` (e.g. `torch:bf16`); without a dtype it takes --dtype. Each one is probed before
anything heavy runs: a backend that cannot run on this machine is either skipped with the reason (when validate chose
it by default) or refused with the reason and the install command (when the user named it).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..dtypes import COMPUTE_DTYPES, parse_dtype, short_name
from ..errors import InputError
from ..runtime.factory import BACKENDS, ONNX_BACKENDS

# validate's lists (every backend validate runs by default, in report order), derived from the one backend table (runtime/factory.BACKENDS)
ALL_BACKENDS = tuple(n for n, b in BACKENDS.items() if b.validate == "default")
GPU_BACKENDS = tuple(n for n in ALL_BACKENDS if BACKENDS[n].gpu)
NAMED_ONLY = tuple(n for n, b in BACKENDS.items() if b.validate == "named")  # starts worker processes


@dataclass(frozen=True)
class BackendRequest:
    name: str
    dtype: torch.dtype
    dtype_given: bool  # named in the request (name:dtype) rather than taken from --dtype

    @property
    def label(self) -> str:
        return f"{self.name}:{dtype_name(self.dtype)}"


def dtype_name(dtype: torch.dtype) -> str:
    return short_name(dtype)


def parse_backends(text: str | None, default_dtype: str) -> tuple[list[BackendRequest], bool]:
    """`torch,ort-cpu:fp16` -> requests, and whether the user chose them (False: every known backend, by default)."""
    base = parse_dtype(default_dtype)
    if not text:
        return [BackendRequest(n, base, False) for n in ALL_BACKENDS], False
    requests = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        name, _, dt = item.partition(":")
        if name == "ort":  # what generate calls it: the CUDA provider where a GPU is visible, else the CPU one
            name = "ort-cuda" if torch.cuda.is_available() else "ort-cpu"
        if name not in ALL_BACKENDS + NAMED_ONLY:
            raise InputError(f"unknown backend {name!r}; backends: {', '.join(ALL_BACKENDS + NAMED_ONLY)} (ort = ort-cuda with a "
                             "GPU, ort-cpu without)")
        if dt and dt not in COMPUTE_DTYPES:
            raise InputError(f"unknown dtype {dt!r} in backend {item!r}; use one of fp32, fp16, bf16")
        req = BackendRequest(name, parse_dtype(dt) if dt else base, bool(dt))
        if req not in requests:
            requests.append(req)
    if not requests:
        raise InputError("--backends names no backend")
    return requests, True


def _registered(name: str) -> bool:
    return name in BACKENDS


def _has_module(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _ort_providers() -> list[str]:
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):  # onnxruntime-gpu wheels find the CUDA libraries of the pip packages this way
        # a failed preload only means the CUDA provider will be missing below
        with contextlib.suppress(Exception):
            ort.preload_dlls()
    return ort.get_available_providers()


def unavailable_reason(name: str, explicit: bool = False) -> str | None:
    """None when `name` can run here; otherwise one line saying why and what to install. torch-fast without a GPU runs
    its kernels in Triton's CPU interpreter (about half a second per step on the tiny presets): only when named."""
    gpu = torch.cuda.is_available()
    if name == "torch":
        return None
    if name == "torch-fast" and not gpu and not explicit:
        return ("torch-fast needs a CUDA GPU and none is visible to torch here (name it in --backends to run its "
                "kernels in Triton's CPU interpreter, slowly)")
    if name in GPU_BACKENDS and not gpu and name != "torch-fast":
        return f"{name} needs a CUDA GPU and none is visible to torch here"
    if name == "torch-fast" and not _has_module("triton"):
        return "torch-fast needs triton; install it with: pip install 'mambadeploy[gpu]'"
    if name in ONNX_BACKENDS:
        if not _has_module("onnxruntime"):
            pkg = "onnx" if name == "ort-cpu" else "gpu"
            return f"{name} needs onnxruntime; install it with: pip install 'mambadeploy[{pkg}]'"
        if name == "ort-cuda" and "CUDAExecutionProvider" not in _ort_providers():
            return ("ort-cuda needs onnxruntime-gpu (the installed onnxruntime has no CUDAExecutionProvider); "
                    "install it with: pip uninstall -y onnxruntime && pip install onnxruntime-gpu")
    if name == "trt" and not _has_module("tensorrt"):
        return ("trt needs TensorRT >= 10.6 (module tensorrt), which is not installed; install it with: "
                "pip install 'mambadeploy[trt]' (the wheels download from NVIDIA's index; TensorRT-RTX plans do not "
                "run on compute capability 9.0 GPUs such as the H100)")
    if not _registered(name):
        return f"backend {name!r} is not part of this mambadeploy build yet (runtime/factory.py does not register it)"
    return None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
