"""Our own format: `mambadeploy.json` (the ModelConfig) + `model.safetensors` (our parameter names), bit-exact."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ... import __version__
from ...errors import CheckpointError, read_json
from ..config import ModelConfig
from .common import assign_weights

if TYPE_CHECKING:
    from ..model import MambaMoELM

FORMAT_VERSION = 1


def save_native(model, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format": "mambadeploy", "format_version": FORMAT_VERSION, "mambadeploy_version": __version__,
            "dtype": str(model.dtype).replace("torch.", ""), "config": model.config.to_dict()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # write to temp names then rename, so a crash never leaves a half-written checkpoint
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".tmp", delete=False) as f:
        tmp_w = f.name
    save_file(tensors, tmp_w, metadata={"format": "mambadeploy"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_w, 0o666 & ~umask)  # NamedTemporaryFile makes it 0600; the checkpoint gets a plain file's mode
    os.replace(tmp_w, directory / "model.safetensors")
    (directory / "mambadeploy.json.tmp").write_text(json.dumps(meta, indent=2))
    os.replace(directory / "mambadeploy.json.tmp", directory / "mambadeploy.json")
    return directory


def load_native(directory: Path, dtype: torch.dtype, device) -> MambaMoELM:
    from ..model import empty_model

    meta = read_json(directory / "mambadeploy.json", CheckpointError)
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{directory}: format_version {meta['format_version']} is newer than this mambadeploy")
    config = ModelConfig.from_dict(meta["config"], f"{Path(directory) / 'mambadeploy.json'}: config")
    wfile = directory / "model.safetensors"
    if not wfile.exists():
        raise CheckpointError(f"{directory}: model.safetensors is missing")
    try:
        weights = load_file(str(wfile), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{wfile}: truncated or corrupt safetensors file ({exc})") from exc
    model = empty_model(config, dtype, device)
    assign_weights(model, weights, str(wfile))
    model.source = {"kind": "native", "path": str(directory)}
    return model
