"""SCAP activation sparsity (arXiv 2412.07174) in the reference model: which linear inputs can be sparsified (*sites*),
the per-site sparsifier (mode m, threshold t, folded bias), and the sparse MoE / MLP feed-forwards.

A sparsified linear computes  y = W·s(x) + b'  with  s(x) = (x − m) where |x − m| > t, else 0,  and b' = b + W·(m·1):
exactly W·x + b for every entry that survives, so only the small |x − m| are dropped. The mask is computed in fp32.

The settings live in `ModelConfig.sparsity` (plain JSON, so checkpoints, manifests and `inspect` carry them):
    {"method": "scap", "target": 0.5, "sites": {"L0.in_proj": {"group": "in_proj", "mode": m, "threshold": t,
                                                              "target": 0.5, "mode_kind": "median"}, ...}}
The folded biases are parameters (`layers.{i}.mixer.sparse.in_proj.folded_bias`), saved with the weights.
A model whose config has no sites builds no sparsifier at all, so it is the dense model bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from . import ref_ops

# --site group (the CLI's --layers names) -> what it sparsifies
GROUPS = {
    "in_proj": "Mamba in_proj input (the normed residual)",
    "x_proj": "Mamba x_proj input (the conv output)",
    "out_proj": "Mamba out_proj input (the gated scan output)",
    "fc1": "MoE expert fc1 input (shared by the experts; the router still sees the dense input)",
    "fc2": "MoE expert fc2 input (act(gate)·up of each chosen expert)",
    "mlp": "dense MLP fc1 and fc2 inputs",
    "attn": "attention q/k/v input and o_proj input",
}
DEFAULT_GROUPS = ("in_proj", "x_proj", "out_proj", "fc1", "fc2", "mlp", "attn")


def sparsify_ref(x, mode: float, threshold: float):
    """x (..., n) -> (x − mode) where |x − mode| > threshold else 0, fp32 math, in x.dtype."""
    xf = x.float() - mode
    return torch.where(xf.abs() > threshold, xf, torch.zeros((), dtype=xf.dtype, device=x.device)).to(x.dtype)


def sites(config) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """Every sparsifiable input of the model: (site name, group, module path in the block, linear names it feeds)."""
    out = []
    for i, spec in enumerate(config.layers):
        if spec.mixer == "mamba":
            out += [(f"L{i}.{n}", n, "mixer", (n,)) for n in ("in_proj", "x_proj", "out_proj")]
        elif spec.mixer == "attention":
            out += [(f"L{i}.attn_in", "attn", "mixer", ("q_proj", "k_proj", "v_proj")),
                    (f"L{i}.attn_out", "attn", "mixer", ("o_proj",))]
        if spec.ffn == "moe":
            out += [(f"L{i}.fc1", "fc1", "ffn", ("fc1",)), (f"L{i}.fc2", "fc2", "ffn", ("fc2",))]
        elif spec.ffn == "mlp":
            out += [(f"L{i}.mlp_fc1", "mlp", "ffn", ("fc1",)), (f"L{i}.mlp_fc2", "mlp", "ffn", ("fc2",))]
    return out


class Sparsifier(nn.Module):
    """One linear's input sparsification: mode and threshold (Python floats from the config: graph constants when
    exported) and the folded bias W·(m·1) of its linear (per expert for MoE: (E, out)); none when the mode is 0."""

    def __init__(self, mode: float, threshold: float, bias_shape: tuple[int, ...] | None):
        super().__init__()
        self.mode, self.threshold = float(mode), float(threshold)
        self.folded_bias = nn.Parameter(torch.zeros(bias_shape)) if bias_shape and self.mode != 0.0 else None

    def apply(self, x):
        return sparsify_ref(x, self.mode, self.threshold)

    def linear(self, x, weight, bias=None):
        """F.linear(x, weight, bias) with the input sparsified and the mode folded into the bias: b' = b + W·(m·1)."""
        b = self.folded_bias if bias is None else (bias if self.folded_bias is None else bias + self.folded_bias)
        return F.linear(self.apply(x), weight, b)

    def extra_repr(self) -> str:
        return f"mode={self.mode:.4g}, threshold={self.threshold:.4g}"


def _out_features(module, linear_name: str) -> tuple[int, ...]:
    if linear_name in ("fc1", "fc2"):
        w = module.w1 if linear_name == "fc1" else module.w2
        return tuple(w.shape[:-1])  # MoE (E, out) or MLP (out,)
    return (getattr(module, linear_name).weight.shape[0],)


def attach(model, config) -> None:
    """Build the sparsifiers `config.sparsity` names onto `model`'s mixers and feed-forwards (at construction)."""
    chosen = (config.sparsity or {}).get("sites", {})
    if not chosen:
        return
    for site, _group, where, linears in sites(config):
        if site not in chosen:
            continue
        s = chosen[site]
        module = getattr(model.layers[int(site[1:].split(".")[0])], where)
        if module.sparse is None:
            module.sparse = nn.ModuleDict()
        for name in linears:
            module.sparse[name] = Sparsifier(s["mode"], s["threshold"], _out_features(module, name))


def linear(module, name: str, x):
    """`module.<name>(x)`, through its sparsifier when it has one (the dense path untouched otherwise)."""
    lin = getattr(module, name)
    if module.sparse is None or name not in module.sparse:
        return lin(x)
    return module.sparse[name].linear(x, lin.weight, lin.bias)


# --------------------------------------------------------------------------- sparse feed-forwards
def _part(sparse, name):
    return None if sparse is None or name not in sparse else sparse[name]


def sparse_gated_mlp_ref(x, w1, w2, activation, sparse, record=None):
    """ref_ops.gated_ffn_ref with fc1's and fc2's inputs sparsified (either may be absent); `record` as below."""
    fc1, fc2 = _part(sparse, "fc1"), _part(sparse, "fc2")
    h = F.linear(x, w1) if fc1 is None else fc1.linear(x, w1)
    gate, up = h.chunk(2, dim=-1)
    a = ref_ops.activation_ref(gate, activation) * up
    if record is not None:
        record("fc2", a.reshape(-1, a.shape[-1]))
    return F.linear(a, w2) if fc2 is None else fc2.linear(a, w2)


def _expert_bias(sp, experts=None):
    """Folded per-expert bias (E, out) -> broadcastable onto (T, E, out) or, gathered, onto (T, k, out)."""
    if sp is None or sp.folded_bias is None:
        return None
    return sp.folded_bias if experts is None else sp.folded_bias[experts]


def sparse_moe_ref(x, router_weight, router_bias, w1, w2, router, top_k, activation, sparse, record=None):
    """ref_ops.routed_moe_ref with the experts' fc1 input (shared) and fc2 inputs sparsified. The router sees the dense
    input. Shape-static like expert_gather_ref: every expert + a (T, E) combine when T·k >= E, else a gather of the
    chosen experts. `record(name, tensor)` (calibration) receives the fc2 inputs of the chosen (token, expert) pairs."""
    weights, experts = ref_ops.route_ref(F.linear(x, router_weight, router_bias), router, top_k)
    fc1, fc2 = _part(sparse, "fc1"), _part(sparse, "fc2")
    xs = x if fc1 is None else fc1.apply(x)
    T, E = x.shape[0], w1.shape[0]
    if T * experts.shape[1] >= E:
        combine = torch.zeros(T, E, dtype=torch.float32, device=x.device).scatter_add(1, experts, weights.float())
        h = torch.einsum("td,efd->tef", xs, w1)
        b1, b2 = _expert_bias(fc1), _expert_bias(fc2)
        spec = "tef,edf->ted"
    else:
        combine = None
        w1, w2 = w1[experts], w2[experts]  # (T, k, 2F, d), (T, k, d, F)
        h = torch.einsum("td,tkfd->tkf", xs, w1)
        b1, b2 = _expert_bias(fc1, experts), _expert_bias(fc2, experts)
        spec = "tkf,tkdf->tkd"
    if b1 is not None:
        h = h + b1
    gate, up = h.chunk(2, dim=-1)
    a = ref_ops.activation_ref(gate, activation) * up
    if record is not None:
        record("fc2", a[combine > 0] if combine is not None else a.reshape(-1, a.shape[-1]))
    if fc2 is not None:
        a = fc2.apply(a)
    y = torch.einsum(spec, a, w2)
    if b2 is not None:
        y = y + b2
    mix = combine if combine is not None else weights.float()
    return (y.float() * mix.unsqueeze(-1)).sum(1).to(x.dtype)


def check_config(config) -> list[str]:
    """Problems with `config.sparsity` (unknown sites, missing or non-finite numbers), for ModelConfig.validate."""
    import math

    chosen = config.sparsity.get("sites", {})
    if not isinstance(chosen, dict):
        return ["sparsity.sites must be an object {site: {mode, threshold, target, ...}}"]
    known = {name for name, *_ in sites(config)}
    problems = []
    for name, s in chosen.items():
        if name not in known:
            problems.append(f"sparsity site {name!r} does not exist in this model")
            continue
        for key in ("mode", "threshold", "target"):
            value = s.get(key) if isinstance(s, dict) else None
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                problems.append(f"sparsity site {name!r}: {key} must be a finite number, found {value!r}")
    return problems
