"""Engine fingerprints: what an engine was built from, so an unchanged rebuild is skipped and a mismatched engine is
refused with the reason.

fingerprint = sha256 over a canonical JSON of: the graph's sha256 (ONNX file + its external data), the plugin versions
(op name -> version, plus a hash of the plugin and kernel sources: a changed kernel changes the PTX baked into an AOT
plugin), the TensorRT target and version, the GPU (name + compute capability, or the RTX compute-capability list for a
GPU-less RTX build), and the build flags (precision, profiles). `explain_mismatch` names which of these differ.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

FIELDS = ("graph_sha", "plugins", "trt", "gpu", "flags")
_CHUNK = 1 << 20


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def graph_sha(onnx_path) -> str:
    """sha256 of the ONNX file and of every external-data file beside it that it names (sorted, so order is fixed)."""
    onnx_path = Path(onnx_path)
    h = hashlib.sha256(file_sha256(onnx_path).encode())
    for data in sorted(_external_data_files(onnx_path)):
        h.update(data.name.encode())
        h.update(file_sha256(data).encode())
    return h.hexdigest()


def _external_data_files(onnx_path: Path) -> set[Path]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    files = set()
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                files.add(onnx_path.parent / entry.value)
    return files


def source_sha(paths) -> str:
    """Hash of source files' contents (plugin + kernel code)."""
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def plugin_versions() -> dict:
    """{op: version} for every registry op, plus `sources`: the hash of the plugin and kernel source files."""
    from .. import kernels, plugins
    from ..opset import REGISTRY

    files = [p for pkg in (plugins, kernels) for p in Path(pkg.__file__).parent.rglob("*") if p.suffix in (".py", ".cc",
                                                                                                          ".cu", ".h")]
    versions = {name: entry.version for name, entry in sorted(REGISTRY.items())}
    versions["sources"] = source_sha(files)
    return versions


def fingerprint(graph_sha: str, plugins: dict, trt: dict, gpu: str, flags: dict) -> str:
    return hashlib.sha256(canonical(describe(graph_sha, plugins, trt, gpu, flags)).encode()).hexdigest()


def describe(graph_sha: str, plugins: dict, trt: dict, gpu: str, flags: dict) -> dict:
    return {"graph_sha": graph_sha, "plugins": plugins, "trt": trt, "gpu": gpu, "flags": flags}


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=list)


def explain_mismatch(built: dict, now: dict) -> list[str]:
    """Human-readable differences between two `describe()` dicts, one line per differing field."""
    lines = []
    names = {"graph_sha": "the exported graph", "plugins": "the plugin versions/sources", "trt": "the TensorRT version",
             "gpu": "the GPU", "flags": "the build flags"}
    for key in FIELDS:
        a, b = built.get(key), now.get(key)
        if canonical(a) != canonical(b):
            lines.append(f"{names[key]} changed: built with {_short(a)}, now {_short(b)}")
    return lines


def _short(v) -> str:
    s = canonical(v)
    return s if len(s) <= 120 else s[:117] + "..."
