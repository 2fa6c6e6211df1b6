"""`load_model(path_or_preset, dtype, device)` and `save_model(model, dir)`: the entry points for every checkpoint format.

Formats (one loader module each under loaders/):
  preset name          -> seeded random weights built in memory (presets.py)
  our own directory    -> mambadeploy.json + model.safetensors (loaders/native.py), bit-exact round trip
  BlackMamba native    -> config.json + pytorch_model.bin holding {"model": state_dict} (loaders/blackmamba.py)
  Hugging Face         -> config.json with model_type "mamba" or "jamba" + (sharded) safetensors (loaders/hf.py)
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..dtypes import parse_dtype
from ..errors import CheckpointError, ConfigError, MambaDeployError, read_json
from .model import MambaMoELM, empty_model, init_random_
from .presets import PRESETS, preset_config


def build_preset(name: str, dtype=torch.float32, device="cpu", seed: int = 0) -> MambaMoELM:
    config = preset_config(name)
    model = init_random_(empty_model(config, dtype, device), seed=seed)
    model.source = {"kind": "preset", "name": name, "seed": seed}
    return model.eval()


def detect_format(path: Path) -> str:
    if not path.exists():
        from .trained import TRAINED_CONFIGS

        names = ", ".join([*PRESETS, *TRAINED_CONFIGS])
        raise CheckpointError(f"{path}: no such preset or directory (presets: {names})")
    if path.is_file():
        raise CheckpointError(f"{path}: expected a checkpoint directory, got a file")
    if (path / "mambadeploy.json").exists():
        return "native"
    if (path / "manifest.json").exists():
        return "export"
    cfg = path / "config.json"
    if not cfg.exists():
        raise CheckpointError(f"{path}: no config.json, mambadeploy.json or manifest.json: not a checkpoint directory")
    data = read_json(cfg, CheckpointError)
    if "model_type" in data:
        if data["model_type"] in ("mamba", "jamba"):
            return "hf-" + data["model_type"]
        raise CheckpointError(
            f"{cfg}: unknown model_type {data['model_type']!r} (supported: 'mamba', 'jamba', or a BlackMamba directory)"
        )
    if (path / "pytorch_model.bin").exists() or "mamba_moe_layers" in data:
        return "blackmamba"
    raise CheckpointError(f"{cfg}: cannot tell the checkpoint format (no model_type, no mamba_moe_layers)")


def load_model(path_or_preset, dtype="fp32", device="cpu", max_context: int | None = None) -> MambaMoELM:
    """Load a preset name or a checkpoint directory of any supported format, in eval mode. max_context: the attention
    KV cache's slots per sequence (None: the checkpoint's own context, e.g. Jamba's max_position_embeddings)."""
    from .trained import resolve

    dtype = parse_dtype(dtype)
    path_or_preset = resolve(path_or_preset)  # a trained preset is a committed checkpoint directory
    if isinstance(path_or_preset, str) and path_or_preset in PRESETS:
        return set_max_context(build_preset(path_or_preset, dtype, device), max_context)
    path = Path(path_or_preset)
    fmt = detect_format(path)
    if fmt == "export":
        raise CheckpointError(f"{path} is an export or engine directory (manifest.json), not a checkpoint: run an "
                              "export with --backend ort, engines (mambadeploy build) with --backend trt")
    try:
        model = _loader(fmt)(path, dtype, device)
    except MambaDeployError:
        raise
    except Exception as exc:  # safetensors / torch.load / OS errors on the files themselves
        raise CheckpointError(f"{path}: the checkpoint's weight files could not be read ({type(exc).__name__}: "
                              f"{str(exc)[:300]}); a truncated or corrupt file?") from exc
    check_weights_finite(model, path)
    return set_max_context(model, max_context).eval()


def set_max_context(model: MambaMoELM, max_context: int | None) -> MambaMoELM:
    """Size the attention KV cache to max_context slots per sequence (None: leave it; models without attention have no
    cache and are left as they are). The cache is preallocated, so this is the memory a sequence holds."""
    if max_context is None:
        return model
    if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 1:
        raise ConfigError(f"max context must be a positive number of tokens, got {max_context!r}")
    model.config.max_seq_len = max_context
    for block in model.layers:
        if hasattr(block.mixer, "max_len"):
            block.mixer.max_len = max_context
    return model


def _loader(fmt: str):
    if fmt == "native":
        from .loaders.native import load_native

        return load_native
    if fmt == "blackmamba":
        from .loaders.blackmamba import load_blackmamba

        return load_blackmamba
    from .loaders.hf import load_hf

    return load_hf


@torch.no_grad()
def check_weights_finite(model, source) -> None:
    """Refuse weights holding NaN or Inf, naming the first such tensors (one pass over each tensor, at load)."""
    bad = []
    for name, p in model.named_parameters():
        n = int((~torch.isfinite(p)).sum())
        if n:
            bad.append(f"{name} ({n} of {p.numel()} values)")
    if bad:
        more = f" and {len(bad) - 3} more tensors" if len(bad) > 3 else ""
        raise CheckpointError(f"{source}: non-finite weights (NaN or Inf) in {', '.join(bad[:3])}{more}")


def save_model(model: MambaMoELM, directory) -> Path:
    from .loaders.native import save_native

    return save_native(model, Path(directory))
