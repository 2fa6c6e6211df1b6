"""Which slice of each parameter a rank holds, and the sharded model built from it.

`param_ranges(name, shape, config, mesh)` gives, per dimension of the full parameter, the ranges (start, stop) this rank
keeps (concatenated in order); `take(tensor, ranges)` cuts them out of a full tensor; loaders read them from files
(load.py). `build_local_model` is the reference MambaMoELM at this rank's widths (d_inner / tp, heads / tp, MLP / tp),
with the row-split projections and the MoE swapped for the parallel layers: the reference forward / step run unchanged,
and the state it makes is this rank's share (its channels, its KV heads).
"""

from __future__ import annotations

import copy

import torch

from ..models.model import MambaMoELM
from .layers import ExpertParallelMoE, ParallelGatedMLP, RowParallelLinear
from .mesh import Mesh

Ranges = list  # per dim: list of (start, stop)


def _part(n: int, parts: int, index: int) -> tuple[int, int]:
    size = n // parts
    return index * size, (index + 1) * size


def _shift(r: tuple[int, int], by: int) -> tuple[int, int]:
    return r[0] + by, r[1] + by


def kv_heads_of(config, mesh: Mesh) -> tuple[int, int]:
    """(first KV head, count) this rank keeps: its share when tp divides the KV heads, else the one KV head its query
    heads use (replicated on tp / n_kv ranks)."""
    a = config.attention
    if a.n_kv_heads % mesh.tp == 0:
        first, stop = _part(a.n_kv_heads, mesh.tp, mesh.tp_rank)
        return first, stop - first
    return mesh.tp_rank // (mesh.tp // a.n_kv_heads), 1


def param_ranges(name: str, shape: tuple, config, mesh: Mesh) -> Ranges:
    """Per dim of the full parameter `name` (our names), the ranges this rank holds."""
    ranges = [[(0, s)] for s in shape]
    parts = name.split(".")
    if parts[0] != "layers" or len(parts) < 4:
        return ranges  # embedding, final norm, LM head: replicated
    spec, where, rest = config.layers[int(parts[1])], parts[2], ".".join(parts[3:])
    t, tp = mesh.tp_rank, mesh.tp
    if where == "mixer" and spec.mixer == "mamba":
        di = config.mamba.d_inner
        own = _part(di, tp, t)
        if rest.startswith("in_proj."):
            ranges[0] = [own, _shift(own, di)]  # [x; z] rows
        elif rest in ("conv1d.weight", "conv1d.bias", "dt_proj.weight", "dt_proj.bias", "A_log", "D"):
            ranges[0] = [own]
        elif rest in ("x_proj.weight", "out_proj.weight"):
            ranges[1] = [own]
    elif where == "mixer" and spec.mixer == "attention":
        a = config.attention
        q0, q1 = _part(a.n_heads, tp, t)
        if rest == "q_proj.weight":
            ranges[0] = [(q0 * a.head_dim, q1 * a.head_dim)]
        elif rest in ("k_proj.weight", "v_proj.weight"):
            first, count = kv_heads_of(config, mesh)
            ranges[0] = [(first * a.head_dim, (first + count) * a.head_dim)]
        elif rest == "o_proj.weight":
            ranges[1] = [(q0 * a.head_dim, q1 * a.head_dim)]
    elif where == "ffn" and spec.ffn == "mlp":
        f = config.mlp.ffn_size
        own = _part(f, tp, t)
        if rest == "w1":
            ranges[0] = [own, _shift(own, f)]  # [gate; up] rows
        elif rest == "w2":
            ranges[1] = [own]
    elif where == "ffn" and spec.ffn == "moe" and rest in ("w1", "w2"):
        f = config.moe.ffn_size
        ranges[0] = [_part(config.moe.n_experts, mesh.ep, mesh.ep_index)]
        own = _part(f, mesh.expert_tp, mesh.expert_tp_rank)
        if rest == "w1":
            ranges[1] = [own, _shift(own, f)]
        else:
            ranges[2] = [own]
    return ranges


def take(t: torch.Tensor, ranges: Ranges) -> torch.Tensor:
    """The slices `ranges` of t, concatenated per dim."""
    for dim, spans in enumerate(ranges):
        if spans == [(0, t.shape[dim])]:
            continue
        pieces = [t.narrow(dim, a, b - a) for a, b in spans]
        t = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)
    return t


def local_shape(ranges: Ranges) -> tuple[int, ...]:
    return tuple(sum(b - a for a, b in spans) for spans in ranges)


def local_config(config, mesh: Mesh):
    """The config at this rank's widths (MoE left whole: ExpertParallelMoE reads the full one)."""
    cfg = copy.deepcopy(config)
    if cfg.mamba is not None:
        cfg.mamba.d_inner //= mesh.tp
    if cfg.attention is not None:
        cfg.attention.n_heads //= mesh.tp
        cfg.attention.n_kv_heads = kv_heads_of(config, mesh)[1]
    if cfg.mlp is not None:
        cfg.mlp.ffn_size //= mesh.tp
    cfg.validate()
    return cfg


def build_local_model(config, mesh: Mesh, dtype=torch.float32, device="cpu") -> MambaMoELM:
    """This rank's model, parameters allocated (uninitialised) directly in dtype on device. `model.config` is the local
    config (state shapes are this rank's); `model.full_config` the model's own."""
    local = local_config(config, mesh)
    with torch.device("meta"):
        model = MambaMoELM(local)
        for block in model.layers:
            m = block.mixer
            if block.kind.mixer == "mamba":
                m.x_proj = RowParallelLinear(m.x_proj.in_features, m.x_proj.out_features, False, mesh)
                m.out_proj = RowParallelLinear(m.out_proj.in_features, m.out_proj.out_features,
                                               m.out_proj.bias is not None, mesh)
            elif block.kind.mixer == "attention":
                m.o_proj = RowParallelLinear(m.o_proj.in_features, m.o_proj.out_features, False, mesh)
            if block.kind.ffn == "mlp":
                block.ffn = ParallelGatedMLP(local, mesh)
            elif block.kind.ffn == "moe":
                block.ffn = ExpertParallelMoE(config, mesh)
    model = model._apply(lambda t: torch.empty_like(t, device=device,
                                                    dtype=dtype if t.is_floating_point() else t.dtype))
    model.full_config = config
    model.mesh = mesh
    return model.eval()


def full_parameter_shapes(config) -> dict[str, tuple]:
    """name -> full shape, in the single-process model's parameter order (no memory: built on the meta device)."""
    with torch.device("meta"):
        full = MambaMoELM(config)
    return {name: tuple(p.shape) for name, p in full.named_parameters()}


def gather_state(state: dict, config, mesh: Mesh) -> dict:
    """The full single-process state from every rank's share (all ranks call it; every rank gets the result):
    Mamba states concatenated over channels, KV caches over heads (a replicated KV head taken once)."""
    import torch.distributed as dist

    out = {}
    for name, t in state.items():
        if name == "pos" or mesh.tp == 1:
            out[name] = t
            continue
        parts = [torch.empty_like(t) for _ in range(mesh.world)]
        mesh._run("all_gather (state)", lambda parts=parts, t=t: dist.all_gather(parts, t.contiguous()))
        group = parts[mesh.rank - mesh.tp_rank: mesh.rank - mesh.tp_rank + mesh.tp]  # this rank's TP group
        if name.endswith((".key", ".value")) and config.attention.n_kv_heads < mesh.tp:
            group = group[:: mesh.tp // config.attention.n_kv_heads]
        out[name] = torch.cat(group, dim=1)
    return out
