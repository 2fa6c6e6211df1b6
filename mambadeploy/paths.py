"""Paths read from a directory's own manifest are untrusted input: an export or engine directory from elsewhere may
name `../elsewhere/evil.onnx` or hold a symlink out of the directory. Every such path goes through `contained`."""

from __future__ import annotations

from pathlib import Path

from .errors import ManifestPathError


def contained(directory, relative, what: str) -> Path:
    """directory / relative, refused (ManifestPathError) unless it resolves inside `directory` — absolute paths, `..`
    and symlinks pointing out of it included."""
    base = Path(directory).resolve()
    rel = Path(str(relative))
    path = (Path(directory) / rel).resolve()
    if rel.is_absolute() or (path != base and base not in path.parents):
        raise ManifestPathError(f"{directory}: the {what} {str(relative)!r} resolves outside the directory ({path}); "
                                "refusing to read it. Engines, graphs and custom-op libraries execute code: load only "
                                "directories you made yourself")
    return Path(directory) / rel
