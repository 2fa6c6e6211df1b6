"""torch-fast's prefill: the prompt through the sequence kernels in chunks of prefill_chunk tokens (the Mamba layers
carry their conv/SSM state from chunk to chunk, the attention layers append to the KV cache), the LM head on the last
position only; optionally replayed from a CUDA graph per prompt shape (prefill_graphs)."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F

from . import fast_attention
from .fast_state import FastState, empty_state


class FastPrefill:
    """Mixed into TorchFastRunner (uses FastBlocks' _norm / _ffn / _head and the kernel modules)."""

    def _mamba_prefill(self, layer, x, valid, conv_state=None, ssm_state=None):
        """x (B, L, d) -> (out (B, L, d), conv_state (B, d_inner, K) fp32, ssm_state (B, d_inner, N) fp32), starting
        from the incoming conv_state / ssm_state (the previous chunk's; None: zeros).
        The scan reads time-contiguous (channel-major) rows, so everything it reads is produced channel-major by
        computing W @ x^T instead of x @ W^T (the same GEMMs, no transposing copies): z, the conv output, x_proj's
        dt/B/C and dt_proj's dt."""
        m = layer.mamba
        if m.sparse is not None:  # SCAP-sparse: the reference mixer (prefill is not what the sparse GEMVs are for)
            return m(x, valid, *(() if conv_state is None else (conv_state, ssm_state)))
        di, Bsz, L = m.d_inner, x.shape[0], x.shape[1]
        w_in, b_in = m.in_proj.weight, m.in_proj.bias
        xs = F.linear(x, w_in[:di], None if b_in is None else b_in[:di])  # (B, L, di): the conv reads it token-major
        z = rowwise_mm(w_in[di:].expand(Bsz, -1, -1), x.transpose(1, 2))  # (B, di, L)
        if b_in is not None:
            z = z + b_in[di:, None]
        if valid is not None:
            xs = torch.where(valid[..., None], xs, torch.zeros_like(xs))
        xc = torch.empty(Bsz, di, L, dtype=x.dtype, device=x.device)
        _, conv_state = self._k_conv.causal_conv1d(xs.transpose(1, 2), layer.conv_weight, m.conv1d.bias, conv_state,
                                                   "silu", out=xc)
        xdbl = rowwise_mm(m.x_proj.weight.expand(Bsz, -1, -1), xc)  # (B, R + 2N, L)
        dt_low, B, C = torch.split(xdbl, [m.dt_rank, m.d_state, m.d_state], dim=1)
        if m.dt_norm is not None:  # Jamba: RMSNorm over the feature axis, which is dim 1 here
            norm = self._k_norm.rms_norm
            dt_low = norm(dt_low.transpose(1, 2), m.dt_norm.weight, m.dt_norm.eps).transpose(1, 2)
            B = norm(B.transpose(1, 2), m.B_norm.weight, m.B_norm.eps).transpose(1, 2)
            C = norm(C.transpose(1, 2), m.C_norm.weight, m.C_norm.eps).transpose(1, 2)
        dt = rowwise_mm(m.dt_proj.weight.expand(Bsz, -1, -1), dt_low)  # (B, di, L)
        if valid is not None:  # softplus(-inf) = 0: pad steps leave the state untouched
            dt = torch.where(valid[:, None, :], dt, torch.full_like(dt, float("-inf")))
        y, ssm_state = self._k_scan.selective_scan(xc, dt, layer.A, B, C, layer.D, z, delta_bias=layer.dt_bias,
                                                   delta_softplus=True, initial_state=ssm_state)
        out = rowwise_mm(y.transpose(1, 2), m.out_proj.weight.t().expand(Bsz, -1, -1))  # (B, L, d), no copy of y
        if m.out_proj.bias is not None:
            out += m.out_proj.bias
        return out, conv_state, ssm_state

    @torch.no_grad()
    def prefill(self, input_ids, lengths=None):
        ids = input_ids.to(self.device)
        if lengths is not None:
            lengths = lengths.to(self.device)
        self.model._check_prompt(ids, lengths)
        Bsz, L = ids.shape
        host_lengths = None
        if lengths is not None and int(lengths.min()) < L:
            host_lengths = [int(n) for n in lengths.tolist()]
        filled = L if lengths is None else int(lengths.max())
        if self.prefill_graphs and self.use_cuda_graph and host_lengths is None:
            logits, tensors = self._prefill_graphed(ids)
        else:
            logits, tensors = self._prefill_body(ids, host_lengths)
        return logits, FastState(tensors, Bsz, filled if "pos" in tensors else 0)

    def _prefill_body(self, ids, host_lengths=None):
        """-> (last-position logits (B, V) fp32, state tensors), the prompt in chunks of prefill_chunk tokens.
        host_lengths: each row's real length when rows are left-padded (None: no padding). No host syncs: it is also
        captured (prefill_graphs)."""
        Bsz, L = ids.shape
        tensors = empty_state(self.config, self.dtype, self.kv_dtype, self.device, Bsz)
        valid = None
        if host_lengths is not None:
            lengths = torch.tensor(host_lengths, device=self.device)
            valid = torch.arange(L, device=self.device)[None, :] >= (L - lengths)[:, None]
        first_real = L - max(host_lengths) if host_lengths else 0  # before it every row is padding
        last_pad = L - min(host_lengths) if host_lengths else 0  # from it on no row is padding
        for start in range(first_real // self.prefill_chunk * self.prefill_chunk, L, self.prefill_chunk):
            stop = min(start + self.prefill_chunk, L)
            rows = fast_attention.chunk_rows(host_lengths, Bsz, L, start, stop)
            chunk_valid = valid[:, start:stop] if start < last_pad else None
            logits = self._prefill_chunk(ids[:, start:stop], chunk_valid, rows, tensors)
        if "pos" in tensors:
            tensors["pos"].copy_(lengths if host_lengths is not None else torch.full_like(tensors["pos"], L))
        return logits, tensors

    def _prefill_chunk(self, ids, valid, rows, tensors):
        """One chunk of the prompt, continuing from `tensors` (updated: Mamba states replaced, KV appended).
        Returns the chunk's last-position logits."""
        Bsz, L = ids.shape
        d = self.config.d_model
        residual = F.embedding(ids, self.model.embedding.weight).float().reshape(Bsz * L, d)
        pending = None
        for layer in self.layers:
            i = layer.index
            if layer.mixer == "mamba":
                x = self._norm(pending, residual, layer.mixer_norm).view(Bsz, L, d)
                conv, ssm = f"L{i}.conv", f"L{i}.ssm"
                out, tensors[conv], tensors[ssm] = self._mamba_prefill(layer, x, valid, tensors[conv], tensors[ssm])
                pending = out.reshape(Bsz * L, d)
            elif layer.mixer == "attention":
                x = self._norm(pending, residual, layer.mixer_norm).view(Bsz, L, d)
                out = fast_attention.prefill_chunk(layer.attention, x, tensors[f"L{i}.key"], tensors[f"L{i}.value"], rows)
                pending = out.reshape(Bsz * L, d)
            if layer.ffn != "none":
                pending = self._ffn(layer, pending, residual)
        last = None if pending is None else pending.view(Bsz, L, d)[:, -1]
        return self._head(residual.view(Bsz, L, d)[:, -1], last)

    def _prefill_graphed(self, ids):
        """Prefill replayed from a CUDA graph captured once per prompt shape (B, L): the eager prefill's time is mostly
        the host launching ~10 kernels a layer. Outputs are copied out of the graph's buffers before returning."""
        key = tuple(ids.shape)
        if key not in self._prefill_cache:
            static_ids = ids.clone()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._prefill_body(static_ids, None)  # compiles every kernel at these shapes
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = self._prefill_body(static_ids, None)
            self._prefill_cache[key] = (graph, static_ids, outputs)
        graph, static_ids, (logits, tensors) = self._prefill_cache[key]
        static_ids.copy_(ids)
        graph.replay()
        return logits.clone(), OrderedDict((k, v.clone()) for k, v in tensors.items())


def rowwise_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (B, M, K) @ b (B, K, N) -> (B, M, N) contiguous, one plain GEMM per batch row written in place; either side
    may be any strided or broadcast (expanded weight) view. Used for W @ x^T with channel-major outputs and for
    y^T @ W^T from a channel-major y: torch.matmul of a 2-D weight by a 3-D tensor computes the transposed product
    and copies it back into this layout (on the H100 those copies were 1.7 of the 2.8B's 10.4 ms of prefill kernels at
    2048 tokens), and F.linear copies a non-contiguous input of several rows first."""
    out = torch.empty(a.shape[0], a.shape[1], b.shape[2], dtype=a.dtype, device=a.device)
    for i in range(a.shape[0]):
        torch.mm(a[i], b[i], out=out[i])
    return out

