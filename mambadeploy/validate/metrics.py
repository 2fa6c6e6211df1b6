"""Error figures between a backend's tensors and the fp32 reference's. Plain functions on torch tensors; every figure
is a Python float so it goes straight into the JSON result."""

from __future__ import annotations

import math

import torch


def logit_errors(actual: torch.Tensor, expected: torch.Tensor) -> dict:
    """actual, expected: (B, V) logits. max_abs, max_rel (max abs error / logit scale, the figure tolerances bound),
    mean_abs, and the lowest per-row cosine similarity (1 = same direction)."""
    a, e = actual.detach().float().cpu(), expected.detach().float().cpu()
    if a.shape != e.shape:
        raise ValueError(f"logits of shape {tuple(a.shape)} against reference {tuple(e.shape)}")
    diff = (a - e).abs()
    scale = max(e.abs().max().item(), 1.0)
    return {
        "max_abs": _finite(diff.max().item()),
        "max_rel": _finite(diff.max().item() / scale),
        "mean_abs": _finite(diff.mean().item()),
        "cosine": _finite(torch.nn.functional.cosine_similarity(a, e, dim=-1).min().item(), bad=-1.0),
    }


def tensor_drift(actual: torch.Tensor, expected: torch.Tensor) -> dict:
    """Error of an intermediate tensor (hidden state, state tensor): max abs, max abs relative to the reference tensor's
    own scale (max |expected|, floored at 1e-6 so an all-zero tensor does not divide by zero), mean abs."""
    a, e = actual.detach().float().cpu().reshape(-1), expected.detach().float().cpu().reshape(-1)
    if a.shape != e.shape:
        raise ValueError(f"tensor of {a.numel()} elements against reference of {e.numel()}")
    if a.numel() == 0:
        return {"max_abs": 0.0, "max_rel": 0.0, "mean_abs": 0.0}
    diff = (a - e).abs()
    scale = max(e.abs().max().item(), 1e-6)
    return {"max_abs": _finite(diff.max().item()), "max_rel": _finite(diff.max().item() / scale),
            "mean_abs": _finite(diff.mean().item())}


def worst(rows: list[dict]) -> dict:
    """Combine per-step figures: the largest errors, the smallest cosine."""
    if not rows:
        return {}
    out = {k: max(r[k] for r in rows) for k in ("max_abs", "max_rel", "mean_abs") if k in rows[0]}
    if "cosine" in rows[0]:
        out["cosine"] = min(r["cosine"] for r in rows)
    return out


def percentile(values: list[float], q: float) -> float | None:
    """q-th percentile (0..100) with linear interpolation; None for no values."""
    if not values:
        return None
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q / 100).item())


def _finite(x: float, bad: float = 1e30) -> float:
    """NaN / inf become `bad`: JSON has no NaN, and a NaN output must still fail every bound (errors: huge; cosine: -1)."""
    if not math.isfinite(x):
        return bad
    return float(x)
