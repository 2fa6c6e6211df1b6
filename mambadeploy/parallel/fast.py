"""ParallelFastRunner: torch-fast's decode step (Triton kernels, the whole step in one CUDA graph) on one rank's share
of a sharded model, with the collectives inside the graph. Prefill runs the sharded reference model (runner.py).

It is TorchFastRunner with the three places that meet other ranks' partial sums overridden:
- `_ssm_params`: x_proj's partial (dt, B, C) is all-reduced before the split and the dt/B/C norms;
- `_mamba_step`: out_proj's partial is all-reduced (its bias added on tensor-parallel rank 0 only, so once);
- `_ffn`: the dense MLP's partial is all-reduced; the MoE routes every token (replicated router), keeps the choices of
  this rank's experts (weight 0 elsewhere: the shape-static mask dispatch a graph can hold) and all-reduces over
  the world. Attention's o_proj is the model's RowParallelLinear, which reduces itself.
Everything else (conv and state updates per channel, norms, head) is torch-fast's own code on local widths.
GPU only in practice (on the CPU the kernels run in Triton's interpreter); not yet run on several GPUs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models import ref_ops
from ..runtime.torch_fast import FUSED_DT_MAX_BATCH, TorchFastRunner
from .runner import ParallelRunner


class ParallelFastRunner(TorchFastRunner):
    backend = "parallel-fast"

    def __init__(self, model, mesh, use_cuda_graph: bool = True, check_inputs: bool = True):
        self.mesh = mesh
        super().__init__(model, use_cuda_graph=use_cuda_graph, check_inputs=check_inputs, persistent=False)
        self.rank_runner = ParallelRunner(model, mesh, cuda_graph=False)

    # ------------------------------------------------------------------ prefill and states: the sharded reference
    def prefill(self, input_ids, lengths=None):
        logits, state = self.rank_runner.prefill(input_ids, lengths)
        return logits, self.adopt(state)

    def state_to_torch(self, state) -> dict:
        return self.rank_runner.state_to_torch(super().state_to_torch(state))

    def describe(self):
        return {**super().describe(), **self.mesh.describe(), "backend": self.backend,
                "devices": self.rank_runner.devices}

    # ------------------------------------------------------------------ the step's meeting points
    def _ssm_params(self, m, xc):
        w = m.out_proj.weight
        prefetch = (w, w.numel() * w.element_size()) if "xproj" in self.l2_prefetch else None
        xdbl = self.mesh.all_reduce_tp(self._linear(xc, m.x_proj.weight, prefetch=prefetch))
        dt, B, C = torch.split(xdbl, [m.dt_rank, m.d_state, m.d_state], dim=-1)
        if m.dt_norm is not None:
            dt = self._k_norm.rms_norm(dt, m.dt_norm.weight, m.dt_norm.eps)
            B = self._k_norm.rms_norm(B, m.B_norm.weight, m.B_norm.eps)
            C = self._k_norm.rms_norm(C, m.C_norm.weight, m.C_norm.eps)
        return dt, B, C

    def _mamba_step(self, layer, x, conv_state, ssm_state):
        m = layer.mamba
        di = m.d_inner
        if self._on_gemv(x):
            xz = self._k_gemv.gemv(x, m.in_proj.weight, m.in_proj.bias,
                                   conv=(conv_state, layer.conv_weight, m.conv1d.bias))
            xc = xz[:, :di]
        else:
            xz = self._linear(x, m.in_proj.weight, m.in_proj.bias)
            xc, _ = self._k_conv.causal_conv1d_update(xz[:, :di], conv_state, layer.conv_weight, m.conv1d.bias,
                                                      "silu")
        dt_low, B, C = self._ssm_params(m, xc)
        if x.shape[0] <= FUSED_DT_MAX_BATCH:
            dt, dt_w = dt_low, m.dt_proj.weight
        else:
            dt, dt_w = F.linear(dt_low, m.dt_proj.weight), None
        y, _ = self._k_ssu.selective_state_update(ssm_state, xc, dt, layer.A, B, C, layer.D, xz[:, di:],
                                                  dt_bias=layer.dt_bias, dt_softplus=True, dt_proj_weight=dt_w)
        bias = m.out_proj.bias if self.mesh.tp_rank == 0 else None
        return self.mesh.all_reduce_tp(self._linear(y, m.out_proj.weight, bias))

    def _ffn(self, layer, pending, residual):
        moe = layer.moe
        if moe is None:
            x = self._norm(pending, residual, layer.ffn_norm)
            return self.mesh.all_reduce_tp(ref_ops.gated_ffn_ref(x, layer.mlp.w1, layer.mlp.w2, layer.mlp.activation))
        if layer.fused_route:
            x, _, weights, experts = self._k_route.add_rms_norm_route(
                pending, residual, layer.ffn_norm, self.eps, moe.router.weight, moe.router.bias, moe.router_kind,
                moe.top_k, residual_out=residual)
        else:
            x = self._norm(pending, residual, layer.ffn_norm)
            weights, experts = self._k_route.route_hidden(x, moe.router.weight, moe.router.bias, moe.router_kind,
                                                          moe.top_k)
        local = (experts >= moe.first_expert) & (experts < moe.first_expert + moe.local_experts)
        ids = torch.where(local, experts - moe.first_expert, torch.zeros_like(experts))
        w = torch.where(local, weights, torch.zeros_like(weights))
        return self.mesh.all_reduce_world(self._k_moe.expert_gather(x, moe.w1, moe.w2, ids, w, moe.activation))
