"""The pieces of a torch-fast block shared by prefill and the decode step: residual + RMSNorm, the dense projections
(Triton GEMV or cuBLAS; the SCAP-sparse ones are fast_sparse.py's), the Mamba x_proj split, the feed-forward (router + experts, or the dense MLP) and
the final norm + LM head; and the two hooks where a rank of a sharded model meets the others (parallel/fast.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models import ref_ops, sparsity

# With TorchFastRunner(triton_gemv=True) (the default), decode batches up to this size run the dense projections
# (in_proj, x_proj, out_proj, LM head) on the Triton GEMV (kernels/gemv.py: FMA weight stream at batch 1, tl.dot above,
# split-K for the short-and-wide x_proj) instead of cuBLAS; larger batches keep cuBLAS. Measured on the H100, 2.8B bf16
# graph replay (benchmarks/results/archive/decode_triton_gemv_dot_2.8b_*.json): batch 1 1.129 -> 1.100 ms, batch 8
# 2.337 -> 2.301 ms. A small gain: per projection both stream their weights at ~2 TB/s.
TRITON_GEMV_MAX_BATCH = 8


class FastBlocks:
    """Mixed into TorchFastRunner; uses its model, config, dtype, eps, triton_gemv, l2_prefetch, routing_trace and the
    kernel modules (_k_*)."""

    def _norm(self, pending, residual, weight):
        """residual += pending (in place, fp32), then RMSNorm -> model dtype. pending None: norm of residual alone."""
        if pending is None:
            return self._k_norm.rms_norm(residual, weight, self.eps, out_dtype=self.dtype)
        out, _ = self._k_norm.add_rms_norm(pending, residual, weight, self.eps, residual_out=residual)
        return out

    def _on_gemv(self, x) -> bool:
        """Whether decode rows x take the Triton GEMV (switched on, and few rows) rather than cuBLAS."""
        return self.triton_gemv and x.shape[0] <= TRITON_GEMV_MAX_BATCH

    def _linear(self, x, weight, bias=None, prefetch=None, out=None):
        """x (B, K) @ weight.T (+ bias) for decode rows: the Triton GEMV when _on_gemv (which then also warms L2 with
        `prefetch` = (tensor, nbytes), see gemv), else cuBLAS. out: written when given; it may be fp32 (the model-dtype
        result widened, as gemv's fp32 out)."""
        if self._on_gemv(x):
            return self._k_gemv.gemv(x, weight, bias, prefetch=prefetch, out=out)
        y = F.linear(x, weight, bias)
        return y if out is None else out.copy_(y)

    def _ssm_params(self, m, xc, sparse=None):
        """xc (..., d_inner) -> low-rank dt (..., R), B, C (..., N) (views of one x_proj output); dt_proj (no bias)
        is applied by the caller: a Linear in prefill, fused into the state-update kernel in decode."""
        w = m.out_proj.weight
        prefetch = (w, w.numel() * w.element_size()) if "xproj" in self.l2_prefetch else None
        if sparse and "x_proj" in sparse:
            xdbl = self._partial_sum(self._sparse_linear(xc, "x_proj", sparse["x_proj"], prefetch=prefetch))
        else:
            xdbl = self._partial_sum(self._linear(xc, m.x_proj.weight, prefetch=prefetch))
        dt, B, C = torch.split(xdbl, [m.dt_rank, m.d_state, m.d_state], dim=-1)
        if m.dt_norm is not None:  # Jamba
            dt = self._k_norm.rms_norm(dt, m.dt_norm.weight, m.dt_norm.eps)
            B = self._k_norm.rms_norm(B, m.B_norm.weight, m.B_norm.eps)
            C = self._k_norm.rms_norm(C, m.C_norm.weight, m.C_norm.eps)
        return dt, B, C

    def _ffn(self, layer, pending, residual):
        """residual += pending, then the block's feed-forward on its norm -> (T, d) in model dtype."""
        moe = layer.moe
        if moe is None:
            x = self._norm(pending, residual, layer.ffn_norm)
            if layer.mlp.sparse is not None:  # Jamba's dense MLP, SCAP-sparse: the reference's own math
                return self._partial_sum(sparsity.sparse_gated_mlp_ref(x, layer.mlp.w1, layer.mlp.w2,
                                                                       layer.mlp.activation, layer.mlp.sparse))
            return self._partial_sum(ref_ops.gated_ffn_ref(x, layer.mlp.w1, layer.mlp.w2, layer.mlp.activation))
        if layer.fused_route:
            x, _, weights, experts = self._k_route.add_rms_norm_route(
                pending, residual, layer.ffn_norm, self.eps, moe.router.weight, moe.router.bias, moe.router_kind,
                moe.top_k, residual_out=residual)
        else:
            x = self._norm(pending, residual, layer.ffn_norm)
            weights, experts = self._k_route.route_hidden(x, moe.router.weight, moe.router.bias, moe.router_kind,
                                                          moe.top_k)
        if self.routing_trace is not None:
            self.routing_trace.append((layer.index, experts.clone()))
        if layer.sparse is not None:  # SCAP (fast_sparse.py; prefill rows take the reference's sparse gather)
            return self._sparse_experts(layer, x, weights, experts)
        return self._expert_mix(x, moe, experts, weights)

    # Decode-step hooks where a rank of a sharded model (parallel/fast.py) meets the other ranks: identity / the plain
    # expert gather here.
    def _partial_sum(self, t):
        """t: a partial sum of a row-split projection (x_proj, out_proj, the dense MLP's down): summed over ranks."""
        return t

    def _expert_mix(self, x, moe, experts, weights):
        """The chosen experts' outputs mixed by their weights, (T, d) in the model dtype."""
        return self._k_moe.expert_gather(x, moe.w1, moe.w2, experts, weights, moe.activation)

    def _head(self, residual, pending, out=None):
        """residual (B, d) fp32 + pending (B, d) model dtype (or None) -> logits (B, V) fp32, written into `out` when
        given: the reference's final norm of (residual + pending) in the model dtype (one kernel) and its tied/untied
        head (through _linear into the fp32 buffer: the GEMV writes the widened logits itself)."""
        fn = self.model.final_norm
        if pending is None:
            x = fn(residual.to(self.dtype))
        else:
            x = self._k_norm.final_norm(pending, residual, fn.weight, getattr(fn, "bias", None), fn.eps,
                                        self.config.final_norm)
        w = self.model.embedding.weight if self.model.lm_head is None else self.model.lm_head.weight
        if out is None:
            out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32, device=x.device)
        return self._linear(x, w, out=out)
