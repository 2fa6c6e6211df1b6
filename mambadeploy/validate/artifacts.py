"""The export directories the ONNX backends run: the one the user gave (--export DIR, checked against MODEL before any
work), or ones validate makes itself, one per dtype, in a temporary directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import InputError
from ..models.config import ModelConfig
from .backends import dtype_name


class Exports:
    def __init__(self, target: str, model, given: str | None, ops: str | None):
        self.target, self.model, self.ops = target, model, ops
        self.given = Path(given) if given else None
        self.temp_root: Path | None = None
        self.made: dict[str, Path] = {}  # dtype name -> directory validate exported into
        self.export_s: dict[str, float] = {}

    # ------------------------------------------------------------------ the user's directory
    def manifest(self, directory: Path) -> dict:
        path = directory / "manifest.json"
        if not path.is_file():
            raise InputError(f"{directory} is not an export directory (no manifest.json); make one with "
                             f"`mambadeploy export MODEL --out {directory}`")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON ({exc})") from exc

    def check_given(self) -> None:
        """Refuse an export of another model: its manifest's config must equal MODEL's, and where both sides have a
        weight fingerprint, those must be equal too."""
        manifest = self.manifest(self.given)
        check_same_model(manifest, self.model, self.given, self.target)

    # ------------------------------------------------------------------ per backend
    def get(self, req) -> Path:
        """The export directory for an ONNX backend request: the user's (its dtype must match the request's when the
        request named one) or one made here for the request's dtype."""
        if self.given is not None:
            if not self.given.exists():
                self._export(self.given, req.dtype)
            manifest = self.manifest(self.given)
            have = manifest.get("dtype")
            if req.dtype_given and have and have != dtype_name(req.dtype):
                raise InputError(f"export {self.given} holds {have} graphs but {req.label} asks for "
                                 f"{dtype_name(req.dtype)}; export again with --dtype {dtype_name(req.dtype)}")
            return self.given
        name = dtype_name(req.dtype)
        if name not in self.made:
            self.made[name] = self._export(self.temp_root / name, req.dtype)
        return self.made[name]

    def reference_export(self) -> Path:
        """An fp32 export of MODEL (per-layer ONNX comparisons run against it)."""
        if "fp32" not in self.made:
            self.made["fp32"] = self._export(self.temp_root / "fp32", torch.float32)
        return self.made["fp32"]

    def _export(self, out: Path, dtype: torch.dtype) -> Path:
        import time

        from ..export import export_model

        t0 = time.perf_counter()
        kwargs = {"ops": self.ops} if self.ops else {}
        export_model(self.model, out, dtype=dtype_name(dtype), **kwargs)
        self.export_s[dtype_name(dtype)] = time.perf_counter() - t0
        return out

    def describe(self) -> dict:
        return {"given": str(self.given) if self.given else None,
                "made_by_validate": sorted(self.made), "export_s": self.export_s}


def check_same_model(manifest: dict, model, directory, target) -> None:
    theirs = manifest.get("config")
    if not isinstance(theirs, dict):
        raise InputError(f"{directory}/manifest.json has no model config: cannot tell which model it was exported from")
    ours = model.config.to_dict()
    try:
        theirs_cfg = ModelConfig.from_dict(theirs).to_dict()
    except Exception as exc:  # noqa: BLE001 - any unreadable config means "not this model"
        raise InputError(f"{directory}/manifest.json: unreadable model config ({exc})") from exc
    keys = [k for k in ours if k not in ("extra", "name") and ours[k] != theirs_cfg.get(k)]
    if keys:
        diffs = ", ".join(f"{k} ({_short(theirs_cfg.get(k))} there, {_short(ours[k])} in {target})" for k in keys[:4])
        raise InputError(f"export directory {directory} was made from another model than {target}: {diffs}")
    fingerprint = manifest.get("fingerprint") or manifest.get("checkpoint_fingerprint")
    mine = model_fingerprint(model)
    if fingerprint and mine and fingerprint != mine:
        raise InputError(f"export directory {directory} was made from other weights than {target} (manifest "
                         f"fingerprint {str(fingerprint)[:16]}..., {target} has {mine[:16]}...)")


def model_fingerprint(model) -> str | None:
    """The exporter's weight fingerprint of MODEL, when the exporter defines one."""
    try:
        from ..export import fingerprint
    except ImportError:
        return None
    return fingerprint(model)


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."
