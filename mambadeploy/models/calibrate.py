"""SCAP calibration (arXiv 2412.07174): from a dense model and calibration tokens to a sparse model.

Per site (models/sparsity.sites): collect the linear's input over the calibration windows (one dense pass), choose the
mode m (0 = CATS-like, the median, or the peak of a Gaussian KDE; `auto` keeps whichever zeroes inputs at the least
output error ‖W·r‖², r = the dropped part), set the threshold t = the target-quantile of |x − m|, and fold m into the
bias: b' = b + W·(m·1). The result is a model whose config carries `sparsity` and whose parameters carry the folded
biases, saved like any other checkpoint.
"""

from __future__ import annotations

import copy
import math

import torch

from ..errors import InputError
from . import sparsity
from .model import MambaMoELM

MODES = ("zero", "median", "kde", "auto")
NO_THRESHOLD = -1.0  # target 0: |x − m| > −1 keeps every entry, so the sparse model computes the dense one exactly
MAX_ROWS = 8192  # rows kept per site (seeded subsample): enough for a quantile, bounded memory for big models
ERROR_ROWS = 512  # rows used to compare modes by output error


def check_request(model: MambaMoELM, target: float, groups, mode: str) -> list[tuple]:
    """Validate the request; returns the sites it covers. One clear error per kind of bad input."""
    if not isinstance(target, (int, float)) or not 0.0 <= target < 1.0:
        raise InputError(f"--sparsity must be in [0, 1), got {target!r}")
    if mode not in MODES:
        raise InputError(f"--mode {mode!r}: choose one of {', '.join(MODES)}")
    unknown = [g for g in groups if g not in sparsity.GROUPS]
    if unknown:
        raise InputError(f"--layers: unknown layer name(s) {', '.join(unknown)}; known: {', '.join(sparsity.GROUPS)}")
    chosen = [s for s in sparsity.sites(model.config) if s[1] in groups]
    if not chosen:
        raise InputError(f"--layers {','.join(groups)}: this model ({model.config.layer_pattern()}) has none of them")
    if model.config.sparsity.get("sites"):
        raise InputError("the model is already sparse (calibrated); calibrate the dense checkpoint")
    return chosen


def _site_weights(model, site) -> torch.Tensor:
    """(out, in) matrix of every output the site's input feeds (q/k/v stacked; experts stacked)."""
    name, _group, where, linears = site
    module = getattr(model.layers[int(name[1:].split(".")[0])], where)
    mats = []
    for lin in linears:
        if lin in ("fc1", "fc2"):
            w = module.w1 if lin == "fc1" else module.w2
            mats.append(w.reshape(-1, w.shape[-1]))
        else:
            mats.append(getattr(module, lin).weight)
    return torch.cat(mats).float()


def _keeper(keep):
    """A forward pre-hook that keeps its module's input as fp32 rows."""
    return lambda _module, args: keep(args[0].reshape(-1, args[0].shape[-1]).float())


@torch.no_grad()
def collect(model: MambaMoELM, windows: torch.Tensor, chosen, batch: int = 8, seed: int = 0) -> dict:
    """Run the dense model over `windows` (N, L) and return {site: (rows, features) fp32} of each site's input."""
    from tqdm import tqdm

    store: dict[str, list] = {s[0]: [] for s in chosen}
    handles, recorders = [], []
    for name, group, where, linears in chosen:
        module = getattr(model.layers[int(name[1:].split(".")[0])], where)
        keep = store[name].append
        if group in ("fc1", "mlp") and linears == ("fc1",):  # the feed-forward's own input
            handles.append(module.register_forward_pre_hook(_keeper(keep)))
        elif linears == ("fc2",):
            module.record = lambda _n, t, keep=keep: keep(t.float())
            recorders.append(module)
        else:  # nn.Linear inputs (the first linear stands for q/k/v: they share it)
            lin = getattr(module, linears[0])
            handles.append(lin.register_forward_pre_hook(_keeper(keep)))
    try:
        for start in tqdm(range(0, len(windows), batch), desc="calibration pass", unit="batch", leave=False):
            model(windows[start:start + batch])
    finally:
        for h in handles:
            h.remove()
        for m in recorders:
            m.record = None
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, parts in store.items():
        rows = torch.cat(parts)
        if len(rows) > MAX_ROWS:
            rows = rows[torch.randperm(len(rows), generator=g)[:MAX_ROWS]]
        out[name] = rows
    return out


def _values(rows: torch.Tensor, limit: int = 1 << 20) -> torch.Tensor:
    v = rows.reshape(-1)
    return v[:: max(1, math.ceil(len(v) / limit))]  # torch.quantile refuses more than 16M values


def kde_peak(values: torch.Tensor, points: int = 512, sample: int = 8192) -> float:
    """Peak of a Gaussian KDE (Silverman's bandwidth) on a grid between the 0.5 % and 99.5 % quantiles."""
    v = values[:: max(1, len(values) // sample)].double()
    lo, hi = torch.quantile(v, torch.tensor([0.005, 0.995], dtype=v.dtype)).tolist()
    bw = max(1.06 * float(v.std()) * len(v) ** -0.2, 1e-12)
    grid = torch.linspace(lo, hi, points, dtype=v.dtype)
    density = torch.exp(-0.5 * ((grid[:, None] - v[None, :]) / bw) ** 2).sum(1)
    return float(grid[int(density.argmax())])


def candidate_modes(values: torch.Tensor, mode: str) -> dict[str, float]:
    modes = {"zero": 0.0}
    if mode in ("median", "auto"):
        modes["median"] = float(torch.quantile(values.double(), 0.5))
    if mode in ("kde", "auto"):
        modes["kde"] = kde_peak(values)
    return modes if mode == "auto" else {mode: modes[mode]}


def threshold_for(values: torch.Tensor, m: float, target: float) -> float:
    if target == 0.0:
        return NO_THRESHOLD
    return float(torch.quantile((values.double() - m).abs(), target))


@torch.no_grad()
def output_error(rows: torch.Tensor, weight: torch.Tensor, m: float, t: float) -> float:
    """Mean ‖W·r‖² of the dropped part r = (x − m)·[|x − m| <= t]: the output error the sparsifier causes."""
    centred = rows[:ERROR_ROWS] - m
    dropped = torch.where(centred.abs() <= t, centred, torch.zeros((), dtype=centred.dtype))
    return float((dropped @ weight.T).pow(2).sum(-1).mean())


@torch.no_grad()
def calibrate(model: MambaMoELM, windows: torch.Tensor, target: float, groups=sparsity.DEFAULT_GROUPS,
              mode: str = "auto", seed: int = 0) -> MambaMoELM:
    """A sparse copy of `model` (fp32, CPU) calibrated on token windows (N, L)."""
    from tqdm import tqdm

    model = model.float().cpu().eval()
    if windows.numel() == 0:
        raise InputError("no calibration tokens: the data is empty")
    chosen = check_request(model, target, list(groups), mode)
    stats = collect(model, windows, chosen, seed=seed)
    sites = {}
    for site in tqdm(chosen, desc="modes and thresholds", unit="site", leave=False):
        name, group = site[0], site[1]
        rows = stats[name]
        values = _values(rows)
        if target == 0.0:
            sites[name] = {"group": group, "mode": 0.0, "threshold": NO_THRESHOLD, "target": 0.0, "mode_kind": "zero",
                           "output_error": 0.0}
            continue
        weight = _site_weights(model, site)
        best = None
        for kind, m in candidate_modes(values, mode).items():
            t = threshold_for(values, m, target)
            err = output_error(rows, weight, m, t)
            if best is None or err < best[3]:
                best = (kind, m, t, err)
        kind, m, t, err = best
        sites[name] = {"group": group, "mode": m, "threshold": t, "target": float(target), "mode_kind": kind,
                       "output_error": err}
    config = copy.deepcopy(model.config)
    config.sparsity = {"method": "scap", "target": float(target), "mode": mode, "calibration_windows": list(windows.shape),
                       "sites": sites}
    config.validate()
    sparse = fold(model, config)
    if target > 0.0:
        refine_thresholds(sparse, windows, chosen, target, seed)
    return sparse


def _site_modules(model, chosen):
    """{site: (the block module holding it, its Sparsifier per linear)} of a sparse model."""
    out = {}
    for name, _g, where, linears in chosen:
        module = getattr(model.layers[int(name[1:].split(".")[0])], where)
        out[name] = (module, [module.sparse[lin] for lin in linears])
    return out


@torch.no_grad()
def sparse_site_inputs(sparse: MambaMoELM, windows: torch.Tensor, chosen=None, batch: int = 8) -> dict:
    """{site: (rows, features) fp32}: what each site's sparsifier receives while the sparse model runs `windows`.
    MoE fc2: the chosen (token, expert) pairs only (the all-experts branch computes every expert's hidden)."""
    chosen = chosen or [s for s in sparsity.sites(sparse.config) if s[0] in sparse.config.sparsity.get("sites", {})]
    per_site = _site_modules(sparse, chosen)
    store = {name: [] for name in per_site}
    patched = []
    for name, (module, sps) in per_site.items():
        keep = store[name].append
        if sps[0] is _fc2_of(module):  # feed-forward fc2: the hidden of the rows that count, through `record`
            module.record = lambda _n, t, keep=keep: keep(t.float())
            patched.append((module, None))
            continue
        sp = sps[0]
        sp.apply = lambda x, sp=sp, keep=keep: (keep(x.reshape(-1, x.shape[-1]).float()),
                                                sparsity.sparsify_ref(x, sp.mode, sp.threshold))[1]
        patched.append((module, sp))
    from tqdm import tqdm

    try:
        for start in tqdm(range(0, len(windows), batch), desc="sparse pass", unit="batch", leave=False):
            sparse(windows[start:start + batch])
    finally:
        for module, sp in patched:
            if sp is None:
                module.record = None
            else:
                del sp.apply  # back to the class method
    return {name: torch.cat(parts) for name, parts in store.items()}


def _fc2_of(module):
    sparse = getattr(module, "sparse", None)
    return sparse["fc2"] if sparse is not None and hasattr(module, "w2") and "fc2" in sparse else None


def refine_thresholds(sparse: MambaMoELM, windows: torch.Tensor, chosen, target: float, seed: int = 0) -> None:
    """Thresholds again, from the inputs each site sees in the *sparse* model (one more pass, modes and folded biases
    kept): sparsifying the earlier layers shifts what the later ones receive, and thresholds taken from the dense pass
    alone overshoot the target downstream (+4 points at 0.7 on the trained testbed)."""
    inputs = sparse_site_inputs(sparse, windows, chosen)
    g = torch.Generator().manual_seed(seed)
    for name, (_module, sps) in _site_modules(sparse, chosen).items():
        rows = inputs[name]
        if len(rows) > MAX_ROWS:
            rows = rows[torch.randperm(len(rows), generator=g)[:MAX_ROWS]]
        info = sparse.config.sparsity["sites"][name]
        info["threshold"] = threshold_for(_values(rows), info["mode"], target)
        for sp in sps:
            sp.threshold = info["threshold"]


@torch.no_grad()
def fold(dense: MambaMoELM, config) -> MambaMoELM:
    """Build the sparse model for `config` from the dense weights; each folded bias = W·(m·1), summed in fp64."""
    from .model import empty_model

    sparse = empty_model(config, dense.dtype, dense.device)  # no random init: every tensor is set below
    missing, unexpected = sparse.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and all(k.endswith("folded_bias") for k in missing), (missing, unexpected)
    for name, _g, where, linears in sparsity.sites(config):
        module = getattr(sparse.layers[int(name[1:].split(".")[0])], where)
        if module.sparse is None:
            continue
        for lin in linears:
            sp = module.sparse[lin] if lin in module.sparse else None  # noqa: SIM401 (ModuleDict has no get)
            if sp is None or sp.folded_bias is None:
                continue
            w = (module.w1 if lin == "fc1" else module.w2) if lin in ("fc1", "fc2") else getattr(module, lin).weight
            sp.folded_bias.copy_((w.double().sum(-1) * sp.mode).to(sp.folded_bias.dtype))
    sparse.source = {**getattr(dense, "source", {}), "calibrated": True}
    return sparse.eval()


def realised_sparsity(model: MambaMoELM, windows: torch.Tensor) -> dict[str, float]:
    """Share of zeroed inputs per site (and "all", over every input entry) while the sparse model runs `windows`."""
    counts = {}
    for name, rows in sparse_site_inputs(model, windows).items():
        s = model.config.sparsity["sites"][name]
        counts[name] = (int(((rows - s["mode"]).abs() <= s["threshold"]).sum()), rows.numel())
    result = {k: z / n for k, (z, n) in counts.items() if n}
    zeros, total = sum(z for z, _ in counts.values()), sum(n for _, n in counts.values())
    result["all"] = zeros / total if total else 0.0
    return result


def windows_from_tokens(tokens: torch.Tensor, samples: int, seq_len: int) -> torch.Tensor:
    """`samples` windows of `seq_len` tokens evenly spaced over `tokens` (fewer when the data is short)."""
    if tokens.numel() == 0:
        raise InputError("the calibration data is empty")
    if seq_len < 1 or samples < 1:
        raise InputError(f"--samples and --seq-len must be >= 1, got {samples} and {seq_len}")
    seq_len = min(seq_len, len(tokens))
    n = min(samples, len(tokens) - seq_len + 1)
    starts = torch.linspace(0, len(tokens) - seq_len, n).long()
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()]).long()

