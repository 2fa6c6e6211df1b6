"""ParallelFastRunner: torch-fast's decode step (Triton kernels, the whole step in one CUDA graph) on one rank's share
of a sharded model, with the collectives inside the graph. Prefill runs the sharded reference model (runner.py).

It is TorchFastRunner with its two decode-step hooks filled in:
- `_partial_sum`: x_proj's partial (dt, B, C) (before the split and the dt/B/C norms), out_proj's partial and the
  dense MLP's are all-reduced over the tensor-parallel group;
- `_expert_mix`: every token is routed by the replicated router; this rank keeps the choices of its own experts
  (weight 0 elsewhere: the shape-static mask dispatch a graph can hold) and the partial mix is all-reduced over the
  world. Attention's o_proj is the model's RowParallelLinear, which reduces itself.
Everything else (conv and state updates per channel, norms, head) is torch-fast's own code on local widths.
GPU only in practice (on the CPU the kernels run in Triton's interpreter: checked there on jamba-tiny tp=2,ep=2 and
blackmamba-tiny tp=2,ep=1 against the single-process model); not yet run on several GPUs.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..runtime.torch_fast import TorchFastRunner
from .runner import ParallelRunner


class ParallelFastRunner(TorchFastRunner):
    backend = "parallel-fast"

    def __init__(self, model, mesh, use_cuda_graph: bool = True, check_inputs: bool = True):
        if mesh.tp > 1 and any(b.mixer.out_proj.bias is not None for b in model.layers if b.kind.mixer == "mamba"):
            # torch-fast adds out_proj's bias before the hook's all-reduce: it would count tp times
            raise ConfigError("--parallel-kernels triton: Mamba out_proj with a bias (Hugging Face use_bias) under "
                              "tp > 1 is not supported; use --parallel-kernels torch")
        self.mesh = mesh
        super().__init__(model, use_cuda_graph=use_cuda_graph, check_inputs=check_inputs)
        self.rank_runner = ParallelRunner(model, mesh, cuda_graph=False)

    def prefill(self, input_ids, lengths=None):
        logits, state = self.rank_runner.prefill(input_ids, lengths)
        return logits, self.adopt(state)

    def state_to_torch(self, state) -> dict:
        return self.rank_runner.state_to_torch(super().state_to_torch(state))

    def describe(self):
        return {**super().describe(), **self.mesh.describe(), "backend": self.backend,
                "devices": self.rank_runner.devices}

    def _partial_sum(self, t):
        return self.mesh.all_reduce_tp(t)

    def _expert_mix(self, x, moe, experts, weights):
        local = (experts >= moe.first_expert) & (experts < moe.first_expert + moe.local_experts)
        ids = torch.where(local, experts - moe.first_expert, torch.zeros_like(experts))
        w = torch.where(local, weights, torch.zeros_like(weights))
        return self.mesh.all_reduce_world(self._k_moe.expert_gather(x, moe.w1, moe.w2, ids, w, moe.activation))
