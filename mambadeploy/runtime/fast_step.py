"""torch-fast's decode step: one token per row on the step kernels (causal_conv1d_update and selective_state_update
update the state IN PLACE), captured once per state object into a CUDA graph over that state's own buffers and
replayed afterwards (on a GPU, use_cuda_graph)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InputError
from . import fast_attention
from .fast_state import FastState

# Decode batches up to this size get dt_proj fused into the state-update kernel (one launch fewer per Mamba layer).
# Above it each program would re-read its rows of dt_proj per sequence: on the H100 at batch 64 (2.8B) the fused
# kernel took 75 us a layer against ~10 us for a cuBLAS dt_proj plus the plain kernel.
FUSED_DT_MAX_BATCH = 8


class FastStep:
    """Mixed into TorchFastRunner (uses FastBlocks' pieces, adopt() and the kernel modules)."""

    def _mamba_step(self, layer, x, conv_state, ssm_state):
        m = layer.mamba
        di = m.d_inner
        sp = layer.sparse or {}
        if "in_proj" in sp:  # SCAP: the site's kernel (fast_sparse.py), the conv fused where it can be
            xz, xc = self._sparse_in_proj(x, sp["in_proj"], conv_state, layer.conv_weight, m.conv1d.bias)
        elif self._on_gemv(x):  # in_proj with the conv update in its epilogue
            xz = self._k_gemv.gemv(x, m.in_proj.weight, m.in_proj.bias,
                                   conv=(conv_state, layer.conv_weight, m.conv1d.bias))
            xc = xz[:, :di]
        else:
            xz = self._linear(x, m.in_proj.weight, m.in_proj.bias)
            xc, _ = self._k_conv.causal_conv1d_update(xz[:, :di], conv_state, layer.conv_weight, m.conv1d.bias,
                                                      "silu")
        dt_low, B, C = self._ssm_params(m, xc, sp)
        if x.shape[0] <= FUSED_DT_MAX_BATCH:  # the state-update kernel applies dt_proj itself
            dt, dt_w = dt_low, m.dt_proj.weight
        else:
            dt, dt_w = F.linear(dt_low, m.dt_proj.weight), None
        y, _ = self._k_ssu.selective_state_update(ssm_state, xc, dt, layer.A, B, C, layer.D, xz[:, di:],
                                                  dt_bias=layer.dt_bias, dt_softplus=True, dt_proj_weight=dt_w)
        if "out_proj" in sp:
            return self._partial_sum(self._sparse_linear(y, "out_proj", sp["out_proj"]))
        return self._partial_sum(self._linear(y, m.out_proj.weight, m.out_proj.bias))

    def _step_body(self, st: FastState):
        """One decode step on st's static buffers: reads st.tokens, updates st.tensors and st.residual in place,
        writes st.logits. Everything here is capturable (no host syncs, no allocations that depend on values)."""
        t = st.tensors
        table = self.model.embedding.weight
        first = None  # the first mixer's normed input, straight from the ids (lookup + widening + norm in one kernel)
        if self.layers and self.layers[0].mixer != "none":
            first = self._k_norm.embed_rms_norm(st.tokens, table, self.layers[0].mixer_norm, self.eps,
                                                residual_out=st.residual)
        else:
            st.residual.copy_(F.embedding(st.tokens, table))
        pending = None
        for layer in self.layers:
            i = layer.index
            if layer.mixer != "none":
                x = first if first is not None else self._norm(pending, st.residual, layer.mixer_norm)
                first = None
            if layer.mixer == "mamba":
                pending = self._mamba_step(layer, x, t[f"L{i}.conv"], t[f"L{i}.ssm"])
            elif layer.mixer == "attention":
                pending = fast_attention.decode_step(layer.attention, x, t[f"L{i}.key"], t[f"L{i}.value"], t["pos"],
                                                     self._k_attn.decode_attention)
            if layer.ffn != "none":
                pending = self._ffn(layer, pending, st.residual)
        if "pos" in t:
            t["pos"].add_(1)
        self._head(st.residual, pending, out=st.logits)

    def _ensure_buffers(self, st: FastState):
        if st.tokens is None:
            st.tokens = torch.zeros(st.batch, dtype=torch.int64, device=self.device)
            st.residual = torch.zeros(st.batch, self.config.d_model, dtype=torch.float32, device=self.device)
            st.logits = torch.zeros(st.batch, self.config.vocab_size, dtype=torch.float32, device=self.device)

    def _capture(self, st: FastState):
        """Warm up (compiles every kernel) on a throwaway copy of the state, then capture the step over st's buffers.
        Capturing runs nothing, so st is not advanced."""
        scratch = st.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._step_body(scratch)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step_body(st)
        st.graph = graph

    @torch.no_grad()
    def step(self, token_ids, state):
        st = state if isinstance(state, FastState) else self.adopt(state)
        tokens = token_ids.reshape(-1)
        if tokens.numel() != st.batch:
            raise InputError(f"step got {tokens.numel()} token ids for a state of batch {st.batch}")
        if self.check_inputs:  # a device sync when the ids are on the GPU; benchmarks turn it off
            self.model.check_ids(tokens)
        if "pos" in st.tensors:
            if st.filled >= self.config.max_seq_len:
                raise InputError(f"sequence reached the attention KV cache length ({self.config.max_seq_len})")
            st.filled += 1
        self._ensure_buffers(st)
        st.tokens.copy_(tokens, non_blocking=True)
        if self.use_cuda_graph:
            if st.graph is None:
                self._capture(st)
            st.graph.replay()
        else:
            self._step_body(st)
        return st.logits.clone(), st

