"""Shared by the loaders: put a {our_name: tensor} mapping into a model, checking every key and shape first."""

from __future__ import annotations

import torch

from ...errors import CheckpointError


def assign_weights(model, weights: dict, source: str, unexpected: list[str] | None = None) -> None:
    """Copy `weights` (our parameter names) into `model`. Missing, unexpected and mis-shaped keys are all listed in one
    CheckpointError. `unexpected` carries source keys the caller could not map."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(weights))
    extra = sorted(set(unexpected or []) | (set(weights) - set(params)))
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(params[k].shape)}"
        for k, v in weights.items() if k in params and tuple(v.shape) != tuple(params[k].shape)
    ]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if extra:
            parts.append(f"unexpected keys ({len(extra)}): {', '.join(extra)}")
        if shapes:
            parts.append(f"mis-shaped keys ({len(shapes)}): {'; '.join(shapes)}")
        raise CheckpointError(f"{source}: " + " | ".join(parts))
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v)
