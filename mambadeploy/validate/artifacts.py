"""The export directories the ONNX backends run: the one the user gave (--export DIR, checked against MODEL before any
work), or ones validate makes itself, one per dtype: through the ORT runtime's export cache (runtime/ort_runner.py
export_for: $MAMBADEPLOY_CACHE or ~/.cache/mambadeploy, reused while the checkpoint, dtype, op set and mambadeploy
version stay the same), or with --no-cache in a temporary directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..dtypes import parse_dtype, short_name
from ..errors import InputError
from ..export.manifest import MANIFEST, Manifest
from ..models.config import ModelConfig
from .backends import dtype_name


class Exports:
    def __init__(self, target: str, model, given: str | None, ops: str | None, use_cache: bool = True):
        self.target, self.model, self.ops, self.use_cache = target, model, ops, use_cache
        self.given = Path(given) if given else None
        self.temp_root: Path | None = None
        self.made: dict[tuple, Path] = {}  # (dtype name, op set) -> directory validate exported into
        self.export_s: dict[str, float] = {}

    # ------------------------------------------------------------------ the user's directory
    def manifest(self, directory: Path) -> Manifest:
        if not (directory / MANIFEST).is_file():
            raise InputError(f"{directory} is not an export directory (no {MANIFEST}); make one with "
                             f"`mambadeploy export MODEL --out {directory}`")
        return Manifest.read(directory)

    def check_given(self) -> None:
        """Refuse an export of another model: its manifest's config must equal MODEL's, and its weights must come from
        the same place (see _check_same_weights)."""
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
            have = short_name(manifest.dtype)
            if req.dtype_given and have and have != dtype_name(req.dtype):
                raise InputError(f"export {self.given} holds {have} graphs but {req.label} asks for "
                                 f"{dtype_name(req.dtype)}; export again with --dtype {dtype_name(req.dtype)}")
            return self.given
        from ..runtime.ort_runner import default_ops

        name = dtype_name(req.dtype)
        ops = self.ops or default_ops("cuda" if req.name == "ort-cuda" else "cpu")
        made = [path for (dt, made_ops), path in self.made.items() if dt == name and made_ops == ops]
        return made[0] if made else self._export(self.temp_root / f"{name}-{ops}", req.dtype, ops)

    def dtype_of(self, directory: Path) -> str:
        """The export's dtype as fp32 / fp16 / bf16."""
        return short_name(self.manifest(directory).dtype)

    def reference_export(self, ops: str | None) -> Path:
        """An fp32 export of MODEL with the given op set (per-layer ONNX comparisons run against it): one made here
        already, or a new one."""
        for (dt, made_ops), path in self.made.items():
            if dt == "fp32" and (ops is None or made_ops == ops):
                return path
        return self._export(self.temp_root / f"fp32-reference-{ops or 'default'}", torch.float32, ops)

    def _export(self, out: Path, dtype: torch.dtype, ops: str | None = None) -> Path:
        """Export MODEL in `dtype` (through the cache unless --no-cache or --export DIR). The exporter traces a CPU
        model of that dtype (built again from the target, so a reference held on a GPU stays where it is)."""
        import time

        from ..export.exporter import export_model
        from ..models.model import empty_model

        ops = ops or self.ops
        if self.use_cache and out != self.given:
            from ..runtime.ort_runner import export_for

            t0 = time.perf_counter()
            out = export_for(self.target, dtype=dtype_name(dtype), ops=ops)
            self.made[(dtype_name(dtype), self.manifest(out).ops)] = out
            self.export_s[out.name] = round(time.perf_counter() - t0, 2)  # ~0 when the cache had it
            return out
        t0 = time.perf_counter()
        model = self.model  # the reference's own weights, as a CPU model of the export's dtype
        if model.device.type != "cpu" or model.dtype != dtype:
            model = empty_model(self.model.config, dtype, "cpu")
            model.load_state_dict(self.model.state_dict())
            model.source = getattr(self.model, "source", None)
        manifest = export_model(model, out, **({"ops": ops} if ops else {}))
        del model
        self.made[(dtype_name(dtype), manifest.ops)] = out
        self.export_s[out.name] = round(time.perf_counter() - t0, 2)
        return out

    def engine(self, req, batch: int, prompt_len: int) -> Path:
        """TensorRT engines for a trt request, built from the export of its dtype with profiles that cover the run."""
        from ..trt.build import build_engines

        directory = self.temp_root / f"engine-{dtype_name(req.dtype)}"
        if not (directory / "manifest.json").is_file():
            precision = None if req.dtype == torch.float32 else dtype_name(req.dtype)
            build_engines(self.get(req), directory, target="trt", precision=precision, max_batch=max(batch, 1),
                          max_prompt=max(prompt_len, 1), progress=lambda msg: None)
        return directory

    def describe(self) -> dict:
        return {"given": str(self.given) if self.given else None,
                "made_by_validate": sorted(f"{dt}/{ops}" for dt, ops in self.made), "export_s": self.export_s,
                "cached": self.use_cache}


def check_same_model(manifest: Manifest, model, directory, target) -> None:
    theirs = manifest.config
    if not isinstance(theirs, dict):
        raise InputError(f"{directory}/manifest.json has no model config: cannot tell which model it was exported from")
    ours = model.config.to_dict()
    try:
        theirs_cfg = ModelConfig.from_dict(theirs).to_dict()
    except Exception as exc:  # any unreadable config means "not this model"
        raise InputError(f"{directory}/manifest.json: unreadable model config ({exc})") from exc
    keys = [k for k in ours if k not in ("extra", "name") and ours[k] != theirs_cfg.get(k)]
    if keys:
        diffs = ", ".join(f"{k} ({_short(theirs_cfg.get(k))} there, {_short(ours[k])} in {target})" for k in keys[:4])
        raise InputError(f"export directory {directory} was made from another model than {target}: {diffs}")
    _check_same_weights(manifest, model, Path(directory), target)


def _check_same_weights(manifest: Manifest, model, directory: Path, target) -> None:
    """Same config is not same model: compare where the weights came from (two presets: name and seed) and the
    embedding matrix itself (its first rows, in the export's dtype) with the prefill graph's initializer. One weight
    deep inside differing is a corrupted export, not another model: that is for the numerics to find."""
    theirs = (manifest.checkpoint or {}).get("source") or {}
    ours = getattr(model, "source", None) or {}
    if theirs.get("kind") == ours.get("kind") == "preset" and \
            (theirs.get("name"), theirs.get("seed")) != (ours.get("name"), ours.get("seed")):
        raise InputError(f"export directory {directory} was made from preset {theirs.get('name')} (seed "
                         f"{theirs.get('seed')}), not from {target} (seed {ours.get('seed')})")
    emb = _initializer(manifest, directory, "model.embedding.weight")
    if emb is None:
        return
    mine = model.embedding.weight.detach()[: emb.shape[0]].float().cpu()
    dtype = parse_dtype(manifest.dtype)
    mine = mine.to(dtype).float()
    if emb.shape != mine.shape or not torch.allclose(emb, mine, rtol=1e-2, atol=1e-3):
        raise InputError(f"export directory {directory} was made from other weights than {target}: the embedding "
                         "matrices differ")


def _initializer(manifest: Manifest, directory: Path, name: str, rows: int = 64) -> torch.Tensor | None:
    """The first `rows` rows of one initializer of the prefill graph as an fp32 tensor, or None when absent (read
    without loading the other weights)."""
    import onnx
    from onnx import external_data_helper, numpy_helper

    entry = manifest.graphs.get("prefill")
    path = directory / (entry.file if entry is not None else "prefill.onnx")
    if not path.is_file():
        return None
    proto = onnx.load(str(path), load_external_data=False)
    for init in proto.graph.initializer:
        if init.name == name:
            if external_data_helper.uses_external_data(init):
                external_data_helper.load_external_data_for_tensor(init, str(directory))
            array = numpy_helper.to_array(init)
            return torch.from_numpy(array[:rows].astype("float32"))
    return None


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."
