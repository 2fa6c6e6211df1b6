"""Load the peer kernels from the mamba-ssm 2.3.2.post1 pure-Python wheel (built with MAMBA_SKIP_CUDA_BUILD=TRUE, see
benchmarks/README.md) without running its package __init__, which imports CUDA extensions that were not built.

The wheel is unpacked to a temporary directory; `mamba_ssm`, `mamba_ssm.ops`, `mamba_ssm.ops.triton` and
`mamba_ssm.utils` are registered as empty packages over the unpacked folders, and only the modules we time are imported:
- mamba_ssm.ops.triton.selective_state_update.selective_state_update (its Triton decode kernel);
- mamba_ssm.ops.selective_scan_interface.selective_scan_ref (its PyTorch scan). Its fast Mamba-1 scan is the CUDA
  extension `selective_scan_cuda`, which this wheel does not contain: a stub module stands in for it so that the file
  imports, and nothing calls it.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
import types
import zipfile
from pathlib import Path
from types import SimpleNamespace

WHEEL_DIR = Path(__file__).resolve().parent.parent / ".whl" / "kernels"


def load_peer(wheel_dir: Path = WHEEL_DIR):
    wheels = sorted(Path(wheel_dir).glob("mamba_ssm-*.whl"))
    if not wheels:
        return None
    root = Path(tempfile.mkdtemp(prefix="mamba_ssm_peer_"))
    with zipfile.ZipFile(wheels[-1]) as zf:
        zf.extractall(root)
    sys.path.insert(0, str(root))
    for name in ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton", "mamba_ssm.utils"):
        package = types.ModuleType(name)
        package.__path__ = [str(root.joinpath(*name.split(".")))]
        sys.modules[name] = package
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))  # never called
    ssu = importlib.import_module("mamba_ssm.ops.triton.selective_state_update")
    scan = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    return SimpleNamespace(wheel=wheels[-1].name, selective_state_update=ssu.selective_state_update,
                           selective_scan_ref=scan.selective_scan_ref)
