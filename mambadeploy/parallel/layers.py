"""The pieces of a sharded model that talk to other ranks. Everything else is the reference model (models/layers.py)
built at this rank's widths: a Mamba mixer of d_inner / tp channels runs the same conv, scan and state update on its
own channels; only the row-split projections and the MoE need a collective.

- RowParallelLinear: x_proj (its (dt, B, C) need every channel) and out_proj of a Mamba mixer, o_proj of attention:
  the local product, an all-reduce over the tensor-parallel group, then the bias once.
- ParallelGatedMLP: [gate; up] split by columns, down by rows, one all-reduce.
- ExpertParallelMoE: the router is replicated (every rank routes every token the same way); this rank holds
  n_experts / ep experts, each cut to ffn / (world / ep) of its width. Dispatch:
    mask     every rank already holds every token (activations are replicated between layers), so the local experts
             run on the tokens routed to them (the others get weight 0) and one all-reduce over the world combines.
             Shape-static: it is the only dispatch a CUDA graph can capture.
    alltoall each rank takes 1/world of the tokens, sends each (token, choice) to the ranks holding that expert, those
             run only the rows they received (one GEMM per local expert), results come back and are weighted, and an
             all-gather restores every token everywhere. Less expert compute at prefill sizes; data-dependent shapes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..models import ref_ops
from ..models.layers import GatedMLP, MoE
from .mesh import ALLTOALL_MIN_TOKENS, Mesh


class RowParallelLinear(nn.Linear):
    """A Linear whose input features are this rank's slice: partial product, all-reduce over the tensor-parallel
    group, then the bias (once)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, mesh: Mesh):
        super().__init__(in_features, out_features, bias=bias)
        self.mesh = mesh

    def forward(self, x):
        y = self.mesh.all_reduce_tp(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class ParallelGatedMLP(GatedMLP):
    """GatedMLP at ffn / tp width (w1 = [this rank's gate rows; its up rows], w2 = its columns) + one all-reduce."""

    def __init__(self, config, mesh: Mesh):
        super().__init__(config)
        self.mesh = mesh

    def forward(self, x):
        return self.mesh.all_reduce_tp(super().forward(x))


class ExpertParallelMoE(MoE):
    """MoE over this rank's experts: w1 (E/ep, 2F', d) = [gate; up] slices, w2 (E/ep, d, F'), F' = F / (world/ep);
    the router whole. Parameter names are MoE's, so loaders and random init address it the same way."""

    def __init__(self, config, mesh: Mesh):
        nn.Module.__init__(self)
        m, d = config.moe, config.d_model
        self.mesh = mesh
        self.router_kind, self.top_k, self.activation = m.router, m.top_k, m.activation
        self.n_experts = m.n_experts
        self.local_experts = m.n_experts // mesh.ep
        self.first_expert = mesh.ep_index * self.local_experts
        width = m.ffn_size // mesh.expert_tp
        self.router = nn.Linear(d, m.n_experts, bias=m.router_bias)
        self.w1 = nn.Parameter(torch.empty(self.local_experts, 2 * width, d))
        self.w2 = nn.Parameter(torch.empty(self.local_experts, d, width))

    def forward(self, x):
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        weights, experts = ref_ops.route_ref(F.linear(x2d, self.router.weight, self.router.bias), self.router_kind,
                                             self.top_k)
        if self._use_alltoall(x2d.shape[0]):
            out = self._alltoall(x2d, weights, experts)
        else:
            out = self._masked(x2d, weights, experts)
        return out.reshape(shape)

    def _use_alltoall(self, tokens: int) -> bool:
        mode = self.mesh.layout.dispatch
        if self.mesh.world == 1 or self.mesh.capturing:
            return False
        return mode == "alltoall" or (mode == "auto" and tokens >= ALLTOALL_MIN_TOKENS)

    def _masked(self, x2d, weights, experts):
        """The local experts on every token, weight 0 where a token chose another rank's expert; all-reduce (world)."""
        local = (experts >= self.first_expert) & (experts < self.first_expert + self.local_experts)
        ids = torch.where(local, experts - self.first_expert, torch.zeros_like(experts))
        w = torch.where(local, weights, torch.zeros_like(weights))
        y = ref_ops.expert_gather_ref(x2d, self.w1, self.w2, ids, w, self.activation)
        return self.mesh.all_reduce_world(y.float()).to(x2d.dtype)

    def _alltoall(self, x2d, weights, experts):
        mesh, W = self.mesh, self.mesh.world
        T, d = x2d.shape
        per = math.ceil(T / W)
        lo, hi = mesh.rank * per, min((mesh.rank + 1) * per, T)
        mine_x, mine_w, mine_e = x2d[lo:hi], weights[lo:hi], experts[lo:hi]
        # destination ranks of each (token, choice): every rank of the owning expert group (each holds a slice)
        group = mine_e // self.local_experts
        rows, choices, sends = [], [], []
        for q in range(W):
            r, c = torch.nonzero(group == q // mesh.expert_tp, as_tuple=True)
            rows.append(r)
            choices.append(c)
            sends.append(r.numel())
        rows, choices = torch.cat(rows), torch.cat(choices)
        send_counts = torch.tensor(sends, dtype=torch.int64, device=x2d.device)
        recv = mesh.exchange_counts(send_counts).tolist()
        local_ids = mine_e[rows, choices] - (mine_e[rows, choices] // self.local_experts) * self.local_experts
        got_x = mesh.all_to_all(mine_x[rows], sends, recv)
        got_e = mesh.all_to_all(local_ids, sends, recv)
        out = torch.zeros_like(got_x)
        for e in range(self.local_experts):  # one GEMM per local expert over exactly the rows routed to it
            idx = torch.nonzero(got_e == e, as_tuple=True)[0]
            if idx.numel():
                out[idx] = ref_ops.gated_ffn_ref(got_x[idx], self.w1[e], self.w2[e], self.activation)
        back = mesh.all_to_all(out, recv, sends)
        combined = torch.zeros(per, d, dtype=torch.float32, device=x2d.device)
        combined.index_add_(0, rows, back.float() * mine_w[rows, choices].float()[:, None])
        return mesh.all_gather_world(combined)[:T].to(x2d.dtype)
