"""The engine directory: `manifest.json` (what each engine was built from, its fingerprint, profile and checksum, plus
the export's own manifest so a runner needs nothing else), `prefill.engine`, `decode.engine`, `build.log`.

Every write is atomic (temporary file in the same directory, fsync, rename), so an interrupted build never leaves a
half-written engine or manifest that a later run would trust. `load_engine_bytes` checks the checksum and names the fix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import MambaDeployError
from ..paths import contained
from . import fingerprint as fp

MANIFEST = "manifest.json"
FORMAT = "mambadeploy-engines"
FORMAT_VERSION = 1
GRAPHS = ("prefill", "decode")
LOG = "build.log"


def atomic_write_bytes(path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(engine_dir, manifest: dict) -> None:
    atomic_write_bytes(Path(engine_dir) / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


def read_manifest(engine_dir, build_hint: str = "mambadeploy build EXPORT_DIR --out ENGINE_DIR") -> dict:
    path = Path(engine_dir) / MANIFEST
    if not path.exists():
        raise MambaDeployError(f"{engine_dir} is not an engine directory (no {MANIFEST}); build one with: {build_hint}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MambaDeployError(f"{path} is not valid JSON ({exc}); rebuild with: {build_hint}") from exc
    if manifest.get("format") != FORMAT:
        raise MambaDeployError(f"{path} is not a mambadeploy engine manifest (format {manifest.get('format')!r}); "
                               f"point at an engine directory made by: {build_hint}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise MambaDeployError(f"{path} has engine-manifest version {manifest.get('format_version')}, this mambadeploy "
                               f"reads version {FORMAT_VERSION}; rebuild with: {build_hint}")
    return manifest


def engine_path(engine_dir, graph: str) -> Path:
    return Path(engine_dir) / f"{graph}.engine"


def load_engine_bytes(engine_dir, manifest: dict, graph: str) -> bytes:
    """The engine file's bytes, checked against the manifest's size and sha256 (a corrupt or truncated file is refused)."""
    rec = manifest.get("engines", {}).get(graph)
    hint = manifest.get("build_command", "mambadeploy build EXPORT_DIR --out ENGINE_DIR")
    if rec is None:
        raise MambaDeployError(f"engine directory {engine_dir} has no {graph} engine; rebuild with: {hint}")
    path = contained(engine_dir, engine_path(engine_dir, graph).name, f"{graph} engine")  # a symlink out is refused
    if not path.exists():
        raise MambaDeployError(f"{path} is missing; rebuild with: {hint}")
    data = path.read_bytes()
    if len(data) != rec["bytes"] or fp.file_sha256(path) != rec["sha256"]:
        raise MambaDeployError(
            f"{path} is corrupt ({len(data)} bytes, sha256 differs from the manifest's record of {rec['bytes']} bytes); "
            f"rebuild with: {hint} --force"
        )
    return data


def cached_engine_ok(engine_dir, manifest: dict | None, graph: str, fingerprint: str) -> bool:
    """True when the directory already holds an intact engine for this graph with this exact fingerprint."""
    if not manifest:
        return False
    rec = manifest.get("engines", {}).get(graph)
    path = engine_path(engine_dir, graph)
    if not rec or rec.get("fingerprint") != fingerprint or not path.exists():
        return False
    return path.stat().st_size == rec.get("bytes") and fp.file_sha256(path) == rec.get("sha256")


def check_compatible(manifest: dict, graph: str, now: dict) -> None:
    """Refuse an engine built for another TensorRT version / GPU / plugin set, naming what differs and the fix."""
    rec = manifest["engines"][graph]
    built = rec["built_from"]
    diffs = [line for line in fp.explain_mismatch(built, now) if not line.startswith("the exported graph")]
    if diffs:
        raise MambaDeployError(
            f"the {graph} engine does not match this machine: " + "; ".join(diffs) +
            f"; rebuild it here with: {manifest.get('build_command', 'mambadeploy build EXPORT_DIR --out ENGINE_DIR')}"
        )
