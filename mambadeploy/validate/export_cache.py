"""Where validate keeps the exports it makes, so a second `validate MODEL` does not trace the model again.

An entry is reused only when everything that shaped it is the same: the model's config and where its weights came from
(a preset's name and seed; a checkpoint directory's path and its files' sizes and modification times), the dtype and
op set, and the source of the code that exports (models/, export/, opset.py) and of the torch / onnx that ran it.
Root: $MAMBADEPLOY_CACHE, else ~/.cache/mambadeploy; `validate --no-cache` exports to a temporary directory instead.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent


def cache_root() -> Path:
    return Path(os.environ.get("MAMBADEPLOY_CACHE") or Path.home() / ".cache" / "mambadeploy") / "exports"


def _code_digest() -> str:
    h = hashlib.sha256()
    files = sorted([PACKAGE / "opset.py", *(PACKAGE / "models").rglob("*.py"), *(PACKAGE / "export").rglob("*.py")])
    for f in files:
        h.update(str(f.relative_to(PACKAGE)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _weights_identity(model) -> dict | None:
    source = getattr(model, "source", None) or {}
    if source.get("kind") == "preset":
        return {"preset": source.get("name"), "seed": source.get("seed")}
    path = source.get("path")
    if not path or not Path(path).is_dir():
        return None  # weights of unknown origin: never cached
    files = sorted(p for p in Path(path).rglob("*") if p.is_file())
    return {"path": str(Path(path).resolve()),
            "files": [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def entry_for(model, dtype: str, ops: str | None) -> Path | None:
    """The cache directory for this export, or None when the model's weights cannot be identified."""
    import onnx
    import torch

    weights = _weights_identity(model)
    if weights is None:
        return None
    key = json.dumps({"config": model.config.to_dict(), "weights": weights, "dtype": dtype, "ops": ops,
                      "code": _code_digest(), "torch": torch.__version__, "onnx": onnx.__version__}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    name = (model.config.name or model.config.family).replace("/", "_")
    return cache_root() / f"{name}-{dtype}-{ops or 'default'}-{digest}"
