"""Finding and importing TensorRT (target `trt`, module `tensorrt`) or TensorRT-RTX (target `rtx`, module
`tensorrt_rtx_bindings` from the `tensorrt-rtx-cu13-*` wheels).

Why this module exists: TensorRT-RTX's library dlopen()s its own *unversioned* name `libtensorrt_rtx.so` when the ONNX
parser imports a plugin node, but the wheel ships only `libtensorrt_rtx.so.1`; the failed dlopen aborts the process (an
uncatchable C++ terminate). glibc reads LD_LIBRARY_PATH once at process start, so neither setting it later nor preloading
the library with ctypes helps (both tried). The library searches its own directory first (RPATH $ORIGIN), so the fix is a
symlink there, or a directory holding the symlink on LD_LIBRARY_PATH of a *new* process. `plan_env()` gives the
environment for such a child process; builds run in one (mambadeploy.trt.build_worker), which also keeps an abort inside
TensorRT from killing the caller.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import MambaDeployError, lazy_import

TARGETS = {
    # target -> (python module, pip package for the error message, extra, unversioned core library name)
    "trt": ("tensorrt", "tensorrt>=10.6", "trt", "libnvinfer.so"),
    "rtx": ("tensorrt_rtx_bindings", "tensorrt-rtx-cu13-bindings tensorrt-rtx-cu13-libs", "rtx", "libtensorrt_rtx.so"),
}
RTX_LIBS_MODULE = "tensorrt_rtx_libs"


@dataclass(frozen=True)
class TrtInfo:
    target: str
    module: str
    version: str


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise MambaDeployError(f"unknown TensorRT target {target!r}; choose one of: {', '.join(TARGETS)}")
    return target


def is_available(target: str) -> bool:
    """True when the Python module of the target is installed (does not import it)."""
    return importlib.util.find_spec(TARGETS[check_target(target)][0]) is not None


def import_trt(target: str):
    """Import the TensorRT Python module of `target`, or raise MissingDependencyError naming the install command."""
    module, package, extra, _ = TARGETS[check_target(target)]
    why = "building TensorRT engines" if target == "trt" else "building TensorRT-RTX plans"
    return lazy_import(module, package, extra, why)


def version_of(trt) -> str:
    """The library version string (TensorRT-RTX's module has no __version__; its package metadata does)."""
    v = getattr(trt, "__version__", None)
    if v:
        return str(v)
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("tensorrt_rtx_cu13_bindings", "tensorrt-rtx-cu13-bindings", "tensorrt_rtx_cu12_bindings"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "unknown"


def rtx_library_dir() -> Path | None:
    """Directory of libtensorrt_rtx.so.1 inside the installed libs wheel, or None."""
    spec = importlib.util.find_spec(RTX_LIBS_MODULE)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def unversioned_library_present(target: str) -> bool:
    """Can the library's dlopen of its unversioned name succeed in a process started with the current environment?"""
    if target != "rtx":
        return True  # full TensorRT ships libnvinfer.so as a link in its libs wheel
    name = TARGETS["rtx"][3]
    libdir = rtx_library_dir()
    dirs = ([libdir] if libdir else []) + [Path(p) for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    return any((d / name).exists() for d in dirs)


def plan_env(target: str, base: dict | None = None) -> dict:
    """Environment for a child process that builds with `target`: for rtx, a temp dir holding the unversioned symlink is
    put first on LD_LIBRARY_PATH (nothing is written into site-packages)."""
    env = dict(os.environ if base is None else base)
    if target != "rtx" or unversioned_library_present(target):
        return env
    libdir = rtx_library_dir()
    if libdir is None or not (libdir / "libtensorrt_rtx.so.1").exists():
        raise MambaDeployError(
            "TensorRT-RTX libraries not found (package tensorrt-rtx-cu13-libs); install them with: "
            "pip install 'mambadeploy[rtx]'"
        )
    link_dir = Path(tempfile.gettempdir()) / f"mambadeploy-rtx-libs-{os.getuid()}"
    link_dir.mkdir(exist_ok=True)
    link = link_dir / TARGETS["rtx"][3]
    if not link.exists() or link.resolve() != (libdir / "libtensorrt_rtx.so.1").resolve():
        tmp = link_dir / f".{link.name}.{os.getpid()}"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(libdir / "libtensorrt_rtx.so.1")
        os.replace(tmp, link)  # atomic: concurrent builds never see a half-made link
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(link_dir), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def require_plugin_safe_process(target: str) -> None:
    """Refuse (instead of letting the process abort) to import plugin nodes in a process that lacks the library link."""
    if not unversioned_library_present(target):
        libdir = rtx_library_dir()
        raise MambaDeployError(
            "TensorRT-RTX aborts the process when it loads a plugin node unless libtensorrt_rtx.so (unversioned) can be "
            f"found: run `ln -s libtensorrt_rtx.so.1 {libdir}/libtensorrt_rtx.so`, or start the process with a directory "
            "holding that link on LD_LIBRARY_PATH (`mambadeploy build` does this for you)"
        )


def info(target: str) -> TrtInfo:
    trt = import_trt(target)
    return TrtInfo(target, TARGETS[target][0], version_of(trt))
