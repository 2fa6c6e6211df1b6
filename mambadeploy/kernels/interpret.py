"""Run the Triton kernels on CPU tensors through Triton's interpreter, without changing them for anyone else.

Triton (3.6 .. 3.9) reads TRITON_INTERPRET when `@triton.jit` *decorates* a function, i.e. when a kernel module is
imported: with it set, the module-level kernels become interpreter objects for the whole process, and the ahead-of-time
compile of the same kernels for the TensorRT plugins (issue 7) would break if it ran in the same process. So the
module-level kernels stay JITFunctions, and CPU tensors run through a *twin* of this package: the same source files
executed once more,
under the name `mambadeploy.kernels._interpreted.<module>`, with TRITON_INTERPRET=1 set while they are imported (their
relative imports resolve inside the twin, so helper @triton.jit functions are interpreted too).

When the process already runs with TRITON_INTERPRET=1, the module-level kernels are interpreted and used as they are.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
from pathlib import Path

_TWIN = __name__.rsplit(".", 1)[0] + "._interpreted"
_DIR = Path(__file__).resolve().parent
_lock = threading.Lock()


def is_interpreted(kernel) -> bool:
    """True when `kernel` runs in Triton's interpreter (decorated while TRITON_INTERPRET=1 was set)."""
    return type(kernel).__name__ == "InterpretedFunction"


def _load_twin(module: str):
    name = f"{_TWIN}.{module}"
    if name in sys.modules:
        return sys.modules[name]
    if _TWIN not in sys.modules:
        package = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(_TWIN, None, is_package=True))
        package.__path__ = [str(_DIR)]
        sys.modules[_TWIN] = package
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return importlib.import_module(name)  # the twin's own relative imports load under the twin package too
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


def kernel_for(kernel, tensor):
    """The kernel to launch for `tensor`: `kernel` itself on a GPU (or when already interpreted), else its
    interpreted twin (same source, same name)."""
    if tensor.is_cuda or is_interpreted(kernel):
        return kernel
    module = kernel.fn.__module__.rsplit(".", 1)[-1]
    with _lock:
        twin = _load_twin(module)
    return getattr(twin, kernel.fn.__name__)
