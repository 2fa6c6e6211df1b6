"""Per-layer drift (--per-layer): which layer's output or state first leaves tolerance, to point at the op that breaks.

Three sources of per-layer tensors, all compared against the fp32 reference with metrics.tensor_drift:
- state tensors (`L{i}.conv`, `L{i}.ssm`, `L{i}.key`, ...) after prefill and after the last teacher-forced step: every
  runner exposes them (Runner.state_to_torch), so this works for every backend;
- the residual stream entering each norm during prefill, for runners built on the torch model (forward pre-hooks):
  `L{i}.out` (after layer i), `L{i}.mixer_out` (after the mixer of a layer that also has a feed-forward), `embed`;
- intermediate ONNX tensors for the ORT backends, through polygraphy (onnx_layers.py).
"""

from __future__ import annotations

import torch

from ..models.config import ModelConfig
from ..models.model import MambaMoELM
from ..models.state import layer_of
from . import tolerances
from .metrics import tensor_drift


def layer_kind(config: ModelConfig, i: int) -> str:
    if i < 0:
        return "embedding"
    if i >= config.n_layers:
        return "head"
    spec = config.layers[i]
    return "+".join(p for p in ((spec.mixer if spec.mixer != "none" else ""), (spec.ffn if spec.ffn != "none" else "")) if p)


def torch_model_of(runner) -> MambaMoELM | None:
    model = getattr(runner, "model", None)
    return model if isinstance(model, MambaMoELM) else None


@torch.no_grad()
def residual_stream(model: MambaMoELM, ids: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run the model's forward on a prompt, capturing the residual stream at every norm's input (valid positions only,
    fp32, CPU): the hidden state layer by layer."""
    snaps: dict[str, torch.Tensor] = {}
    hooks = []
    last = {"name": "embed"}  # the stream before the first layer is the embedding

    def capture(name):
        def hook(_module, args):  # args: (residual,) or (residual, pending sub-layer output): the stream is their sum
            stream = args[0].float() if len(args) < 2 or args[1] is None else args[0] + args[1].float()
            snaps[name] = stream.detach()
        return hook

    for i, block in enumerate(model.layers):
        before = "embed" if i == 0 else f"L{i - 1}.out"
        if block.mixer_norm is not None:
            hooks.append(block.mixer_norm.register_forward_pre_hook(capture(before)))
        if block.ffn_norm is not None:
            name = f"L{i}.mixer_out" if block.mixer_norm is not None else before
            hooks.append(block.ffn_norm.register_forward_pre_hook(capture(name)))
        last["name"] = f"L{i}.out"
    hooks.append(model.final_norm.register_forward_pre_hook(capture(last["name"])))
    try:
        device = model.device
        model.forward(ids.to(device), lengths.to(device))
    finally:
        for h in hooks:
            h.remove()
    L = ids.shape[1]
    valid = torch.arange(L)[None, :] >= (L - lengths)[:, None]
    return {k: v.cpu()[valid] for k, v in snaps.items()}


def _layer_from_name(name: str) -> int | None:
    return -1 if name == "embed" else layer_of(name)


def drift_rows(candidate: dict, reference: dict, phase: str, kind: str, bound: float) -> list[dict]:
    rows = []
    for name, ref in reference.items():
        if name not in candidate or name == "pos":
            continue
        d = tensor_drift(candidate[name], ref)
        rows.append({"name": name, "layer": _layer_from_name(name), "kind": kind, "phase": phase, **d,
                     "ok": d["max_rel"] <= bound})
    return rows


def summarise(rows: list[dict], config: ModelConfig, dtype: torch.dtype, methods: list[str], notes=()) -> dict:
    """Per-layer worst figures and the first layer (in model order) with a tensor out of tolerance."""
    bound = tolerances.PER_LAYER_REL[dtype]
    layers = []
    for i in range(-1, config.n_layers + 1):  # -1: embedding (and masks), n_layers: final norm + LM head
        mine = [r for r in rows if r["layer"] == i]
        if not mine:
            continue
        worst = max(mine, key=lambda r: r["max_rel"])
        layers.append({"layer": i, "kind": layer_kind(config, i), "max_rel": worst["max_rel"],
                       "max_abs": max(r["max_abs"] for r in mine), "worst_tensor": worst["name"],
                       "ok": all(r["ok"] for r in mine)})
    bad = [l for l in layers if not l["ok"]]
    first_tensor = None
    if bad:
        # within the first bad layer, the tensor that comes first in graph/model order is the best pointer
        first_tensor = next(r["name"] for r in rows if r["layer"] == bad[0]["layer"] and not r["ok"])
    return {"methods": methods, "bound_rel": bound, "layers": layers, "tensors": rows,
            "first_bad_layer": bad[0]["layer"] if bad else None,
            "first_bad_kind": bad[0]["kind"] if bad else None,
            "first_bad_tensor": first_tensor, "notes": list(notes)}
