"""torch-fast backend: the reference model's own weights run on the Triton kernels (mambadeploy/kernels), with dense
projections through torch (cuBLAS; at batch-1 decode the Triton GEMV of kernels/gemv.py, switch `triton_gemv`),
and the decode step captured in a CUDA graph.

- prefill: sequence kernels (causal_conv1d, selective_scan, add_rms_norm, route_hidden + expert_gather), the LM head
  on the last position only.
- step: one token per row on the step kernels (causal_conv1d_update, selective_state_update update the state IN PLACE).
  On a GPU the whole step is captured once per state object into a CUDA graph over that state's own buffers (static
  token, residual and logits buffers beside them) and replayed afterwards; each state owns its buffers, so two
  sequences never alias.
- State: a FastState holding the tensors under the names of models/state.py. step() ADVANCES THE STATE IT IS GIVEN
  (in place) and returns that same object; a state from another runner (a plain {name: tensor} mapping) is copied in.
- Attention layers (Jamba): runtime/fast_attention.py: prefill through F.scaled_dot_product_attention, decode through
  the length-aware Triton kernel (kernels/decode_attention.py), which reads only the filled KV slots.
- Long prompts are prefilled in chunks of `prefill_chunk` tokens: the Mamba layers carry their conv/SSM state from
  chunk to chunk and the attention layers append to the KV cache, so peak memory follows the chunk, not the prompt.
- On CPU the kernels run in Triton's interpreter (kernels/interpret.py), without CUDA graphs: slow, for tests on the
  tiny presets only.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import __version__
from ..errors import ConfigError, InputError, MambaDeployError, lazy_import
from ..models import ref_ops, sparsity
from ..models.model import MambaMoELM
from ..models.state import state_specs
from . import fast_attention
from .base import Runner

# Decode batches up to this size get dt_proj fused into the state-update kernel (one launch fewer per Mamba layer).
# Above it each program would re-read its rows of dt_proj per sequence: on the H100 at batch 64 (2.8B) the fused
# kernel took 75 us a layer against ~10 us for a cuBLAS dt_proj plus the plain kernel.
FUSED_DT_MAX_BATCH = 8

# With TorchFastRunner(triton_gemv=True) (the default), decode batches up to this size run the dense projections
# (in_proj, x_proj, out_proj, LM head) on the Triton GEMV (kernels/gemv.py: FMA weight stream at batch 1, tl.dot above,
# split-K for the short-and-wide x_proj) instead of cuBLAS; larger batches keep cuBLAS. Measured on the H100, 2.8B bf16
# graph replay (benchmarks/results/decode_triton_gemv_dot_2.8b_*.json): batch 1 1.129 -> 1.100 ms, batch 8
# 2.337 -> 2.301 ms. A small gain: per projection both stream their weights at ~2 TB/s.
TRITON_GEMV_MAX_BATCH = 8

# L2 prefetch sites of the batch-1 decode step (Hopper; kernels/common.l2_prefetch): a kernel warms L2 with the weights
# of a kernel that runs after it, so that HBM keeps streaming through the short kernels and launch gaps in between.
#   xproj: the x_proj GEMV (a short kernel) prefetches out_proj's weight, read two launches later.
# Measured and dropped (H100, 2.8B batch 1, benchmarks/results/decode_l2pf_*.json): the expert fc1 GEMV prefetching
# the same expert's fc2 weights (0.854 -> 0.889 ms) and fc2 prefetching 8 MB of the next layer's in_proj (-> 0.896):
# both compete with a kernel that already streams at full rate.
# Chosen by TorchFastRunner(l2_prefetch=...) or MAMBADEPLOY_L2_PREFETCH: "1"/"all", "0"/"none", or a comma list.
L2_PREFETCH_SITES = ("xproj",)

# The batch-1 step of a Mamba + top-1 MoE model (BlackMamba, MoE-Mamba) as ONE persistent launch
# (kernels/decode_persistent.py) followed by the final norm and the LM head, instead of ~8 launches a block.
# Off by default: on the H100 it measured 0.843 ms a 2.8B step against 0.751 ms for the per-kernel step
# (benchmarks/README.md). TorchFastRunner(persistent=True) or MAMBADEPLOY_PERSISTENT=1 (where the model fits,
# persistent_unsupported, and the step runs on a GPU) turn it on.
PERSISTENT_DEFAULT = False

# Prompt tokens per prefill chunk (TorchFastRunner(prefill_chunk=...), CLI --prefill-chunk). Peak activation memory of
# prefill is set by the chunk, not the prompt; 8K tokens keep every GEMM long (the suggestion; the GPU run of
# benchmarks/long_context.py measures the memory it takes).
PREFILL_CHUNK_DEFAULT = 8192

# KV-cache element types torch-fast accepts (TorchFastRunner(kv_dtype=...), CLI --kv-dtype): "model" keeps the model
# dtype; fp8 (e4m3, unscaled: values past +-448 saturate) halves a bf16 cache, at the error in
# validate/tolerances.KV_FP8_LOGITS_REL.
KV_DTYPES = {"model": None, "fp8": torch.float8_e4m3fn}


def persistent_unsupported(config) -> str | None:
    """Why the persistent batch-1 step cannot run this model (None: it can): every block must be a Mamba mixer alone
    or a top-1 MoE alone, without Jamba's dt/B/C norms."""
    for i, spec in enumerate(config.layers):
        if (spec.mixer, spec.ffn) not in (("mamba", "none"), ("none", "moe")):
            return f"block {i} is {spec.mixer} + {spec.ffn} (needs Mamba-only or MoE-only blocks)"
    if config.sparsity.get("sites"):
        return "the model is SCAP-sparse (the persistent step has no sparse GEMV)"
    if any(s.mixer == "mamba" for s in config.layers) and config.mamba.bcdt_norm:
        return "the Mamba mixers normalise dt/B/C (Jamba)"
    if any(s.ffn == "moe" for s in config.layers):
        moe = config.moe
        if moe.top_k != 1 or moe.router not in ("sigmoid_top1", "softmax_topk"):
            return f"the router is {moe.router} top-{moe.top_k} (needs top-1)"
    return None


def prefetch_sites(spec: str | None) -> frozenset:
    """The L2 prefetch sites named by spec (None: the MAMBADEPLOY_L2_PREFETCH variable, default all)."""
    spec = os.environ.get("MAMBADEPLOY_L2_PREFETCH", "1") if spec is None else spec
    word = spec.strip().lower()
    if word in ("0", "", "none", "off"):
        return frozenset()
    if word in ("1", "all", "on"):
        return frozenset(L2_PREFETCH_SITES)
    sites = frozenset(part.strip() for part in spec.split(",") if part.strip())
    unknown = sites - set(L2_PREFETCH_SITES)
    if unknown:
        raise ConfigError(f"unknown L2 prefetch site(s) {', '.join(sorted(unknown))}; known: "
                          f"{', '.join(L2_PREFETCH_SITES)} (or all / none)")
    return sites


@dataclass
class _Layer:
    """One block's weights, prepared once (views of the model's parameters, plus fp32 copies of the small vectors)."""
    index: int
    mixer: str
    ffn: str
    mixer_norm: torch.Tensor | None = None
    ffn_norm: torch.Tensor | None = None
    mamba: object = None  # the reference MambaMixer (for its Linear weights)
    A: torch.Tensor | None = None  # -exp(A_log), fp32
    D: torch.Tensor | None = None  # fp32
    dt_bias: torch.Tensor | None = None  # fp32
    conv_weight: torch.Tensor | None = None  # (d_inner, d_conv)
    attention: object = None  # the reference Attention
    moe: object = None  # the reference MoE
    fused_route: bool = False  # norm + router in one kernel (router tile small enough)
    mlp: object = None  # the reference GatedMLP
    sparse: dict | None = None  # SCAP: linear name -> (transposed weight, mode, threshold, bias incl. the folded one)


class FastState:
    """Decode state of one batch of sequences: `tensors` under the names of models/state.py (updated in place by
    step), the static buffers and CUDA graph of its decode step, and the host-side count of filled KV slots."""

    def __init__(self, tensors: "OrderedDict[str, torch.Tensor]", batch: int, filled: int = 0):
        self.tensors = tensors
        self.batch = batch
        self.filled = filled  # most KV-cache slots used by any row (attention models), known without a device sync
        self.tokens: torch.Tensor | None = None  # (B,) int64
        self.residual: torch.Tensor | None = None  # (B, d) fp32
        self.logits: torch.Tensor | None = None  # (B, V) fp32
        self.graph = None
        self.persistent = None  # the persistent step's launcher over this state's tensors (batch 1)

    def clone(self) -> "FastState":
        twin = FastState(OrderedDict((k, v.clone()) for k, v in self.tensors.items()), self.batch, self.filled)
        for name in ("tokens", "residual", "logits"):
            setattr(twin, name, getattr(self, name).clone())
        return twin


class TorchFastRunner(Runner):
    backend = "torch-fast"

    def __init__(self, model: MambaMoELM, use_cuda_graph: bool = True, check_inputs: bool = True,
                 prefill_graphs: bool = False, triton_gemv: bool = True, l2_prefetch: str | None = None,
                 persistent: bool | None = None, prefill_chunk: int = PREFILL_CHUNK_DEFAULT,
                 kv_dtype: str = "model"):
        """use_cuda_graph: capture each state's decode step (CUDA only). prefill_graphs: also capture prefill once per
        prompt shape without padding (memory for each shape's activations stays reserved; for benchmarks and fixed
        shapes). check_inputs: check token ids on every step (a device sync when they are on the GPU).
        triton_gemv: the dense decode projections on the Triton GEMV at batch <= TRITON_GEMV_MAX_BATCH (else cuBLAS).
        l2_prefetch: the L2 prefetch sites of the batch-1 step (see L2_PREFETCH_SITES; None: MAMBADEPLOY_L2_PREFETCH,
        default all); Hopper only, a hint that changes no result.
        persistent: the batch-1 step as one persistent launch (see PERSISTENT_DEFAULT); None: PERSISTENT_DEFAULT or
        MAMBADEPLOY_PERSISTENT, and only where the model fits and the step runs on a GPU; True where the model does
        not fit is an error.
        prefill_chunk: prompt tokens per prefill chunk (see PREFILL_CHUNK_DEFAULT).
        kv_dtype: the attention KV cache's element type, a key of KV_DTYPES."""
        lazy_import("triton", "triton", "gpu", "the torch-fast backend's kernels")
        from ..kernels import (
            causal_conv1d,
            decode_attention,
            gemv,
            moe_experts,
            moe_routing,
            rms_norm,
            selective_scan,
            selective_state_update,
            sparse_gemv,
        )

        self._k_conv, self._k_moe, self._k_route, self._k_norm = causal_conv1d, moe_experts, moe_routing, rms_norm
        self._k_scan, self._k_ssu, self._k_gemv = selective_scan, selective_state_update, gemv
        self._k_attn = decode_attention
        if int(prefill_chunk) < 1:
            raise ConfigError(f"prefill chunk must be at least 1 token, got {prefill_chunk}")
        if kv_dtype not in KV_DTYPES:
            raise ConfigError(f"unknown KV cache dtype {kv_dtype!r}; choose one of {', '.join(KV_DTYPES)}")
        self.prefill_chunk = int(prefill_chunk)
        self._k_sparse = sparse_gemv
        self.sparse = bool(model.config.sparsity.get("sites"))  # SCAP checkpoint: sparse GEMVs in decode
        self.triton_gemv = triton_gemv
        self.model = model.eval()
        self.config = model.config
        self.device = model.device
        self.dtype = model.dtype
        self.kv_dtype = KV_DTYPES[kv_dtype] or model.dtype
        self.use_cuda_graph = use_cuda_graph and self.device.type == "cuda"
        self.check_inputs = check_inputs
        self.prefill_graphs = prefill_graphs
        self._prefill_cache: dict = {}
        self.routing_trace: list | None = None  # set to a list to record each MoE layer's experts (eager calls only)
        self.layers = [self._prepare(i, block) for i, block in enumerate(model.layers)]
        self.l2_prefetch = prefetch_sites(l2_prefetch)
        self.eps = self.config.norm_eps
        self.persistent = self._persistent_choice(persistent)

    def _persistent_choice(self, persistent) -> bool:
        reason = persistent_unsupported(self.config)
        if persistent is None:
            wanted = os.environ.get("MAMBADEPLOY_PERSISTENT", "1" if PERSISTENT_DEFAULT else "0") != "0"
            return wanted and reason is None and self.device.type == "cuda"
        if persistent and reason is not None:
            raise ConfigError(f"persistent decode step: {reason}; use persistent=False")
        return bool(persistent)

    # ------------------------------------------------------------------ setup
    @torch.no_grad()
    def _prepare(self, index, block) -> _Layer:
        layer = _Layer(index, block.kind.mixer, block.kind.ffn)
        if block.mixer_norm is not None:
            layer.mixer_norm = block.mixer_norm.weight
        if block.ffn_norm is not None:
            layer.ffn_norm = block.ffn_norm.weight
        if layer.mixer == "mamba":
            m = block.mixer
            layer.mamba = m
            layer.A = (-torch.exp(m.A_log.float())).contiguous()
            layer.D = m.D.float().contiguous()
            layer.dt_bias = m.dt_proj.bias.float().contiguous()
            layer.conv_weight = m.conv_weight
        elif layer.mixer == "attention":
            layer.attention = block.mixer
        if layer.ffn == "moe":
            layer.moe = block.ffn
            shapes = ((1, self.config.d_model), tuple(block.ffn.router.weight.shape))
            layer.fused_route = self._k_route.norm_route_launch_config(shapes) is not None
        elif layer.ffn == "mlp":
            layer.mlp = block.ffn
        if self.sparse:
            layer.sparse = self._prepare_sparse(block)
        return layer

    @staticmethod
    def _prepare_sparse(block) -> dict:
        """Transposed weights (input feature k owns the contiguous row k, so a dropped activation skips a row) and
        merged biases of the sparsified Mamba projections and MoE expert GEMVs. An MoE layer gets both fc1 and fc2
        (the one not sparsified with threshold −1: |x| > −1 keeps every entry, the dense product)."""
        out = {}
        mixer, ffn = block.mixer, block.ffn
        if block.kind.mixer == "mamba" and mixer.sparse is not None:
            for name, sp in mixer.sparse.items():
                lin = getattr(mixer, name)
                bias = lin.bias if sp.folded_bias is None else (
                    sp.folded_bias if lin.bias is None else lin.bias + sp.folded_bias)
                out[name] = (lin.weight.t().contiguous(), sp.mode, sp.threshold, bias)
        if block.kind.ffn == "moe" and ffn.sparse is not None:
            for name, w in (("fc1", ffn.w1), ("fc2", ffn.w2)):
                sp = ffn.sparse[name] if name in ffn.sparse else None  # noqa: SIM401 (ModuleDict has no get)
                mode, threshold, bias = (0.0, -1.0, None) if sp is None else (sp.mode, sp.threshold, sp.folded_bias)
                out[name] = (w.transpose(1, 2).contiguous(), mode, threshold, bias)
        return out or None

    def _sparse_linear(self, x, entry):
        """The sparsified projection of decode rows x: the sparse GEMV at batch <= its MAX_BATCH, else the
        reference's F.linear(sparsify(x), W, b') on the transposed weight's view."""
        wt, mode, threshold, bias = entry
        if x.shape[0] <= self._k_sparse.MAX_BATCH:
            return self._k_sparse.sparse_gemv(x, wt, mode, threshold, bias)
        return F.linear(sparsity.sparsify_ref(x, mode, threshold), wt.t(), bias)

    def _sparse_experts(self, layer, x, weights, experts):
        """The chosen experts of decode rows x (T, d) with sparse fc1 / fc2 GEMVs: one (token, slot) pair per program
        row, each reading its own expert's transposed weights; combined in fp32 as the reference."""
        moe = layer.moe
        T, k = experts.shape
        if T > self._k_sparse.MAX_BATCH:
            return sparsity.sparse_moe_ref(x, moe.router.weight, moe.router.bias, moe.w1, moe.w2, moe.router_kind,
                                           moe.top_k, moe.activation, moe.sparse)
        flat = experts.reshape(-1)
        rows = x.repeat_interleave(k, 0) if k > 1 else x
        wt1, m1, t1, b1 = layer.sparse["fc1"]
        wt2, m2, t2, b2 = layer.sparse["fc2"]
        h = self._k_sparse.sparse_expert_gemv(rows, wt1, flat, m1, t1, b1)
        gate, up = h.chunk(2, dim=-1)
        a = (ref_ops.activation_ref(gate, moe.activation) * up).contiguous()
        y = self._k_sparse.sparse_expert_gemv(a, wt2, flat, m2, t2, b2)
        return (y.float() * weights.reshape(-1, 1).float()).view(T, k, -1).sum(1).to(x.dtype)

    # ------------------------------------------------------------------ shared pieces
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
            xdbl = self._partial_sum(self._sparse_linear(xc, sparse["x_proj"]))
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
        if layer.sparse is not None:
            if x.shape[0] > self._k_sparse.MAX_BATCH:  # prefill rows: the reference's static gather, sparse
                return sparsity.sparse_moe_ref(x, moe.router.weight, moe.router.bias, moe.w1, moe.w2,
                                               moe.router_kind, moe.top_k, moe.activation, moe.sparse)
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

    # ------------------------------------------------------------------ prefill
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
        z = _rowwise_mm(w_in[di:].expand(Bsz, -1, -1), x.transpose(1, 2))  # (B, di, L)
        if b_in is not None:
            z = z + b_in[di:, None]
        if valid is not None:
            xs = torch.where(valid[..., None], xs, torch.zeros_like(xs))
        xc = torch.empty(Bsz, di, L, dtype=x.dtype, device=x.device)
        _, conv_state = self._k_conv.causal_conv1d(xs.transpose(1, 2), layer.conv_weight, m.conv1d.bias, conv_state,
                                                   "silu", out=xc)
        xdbl = _rowwise_mm(m.x_proj.weight.expand(Bsz, -1, -1), xc)  # (B, R + 2N, L)
        dt_low, B, C = torch.split(xdbl, [m.dt_rank, m.d_state, m.d_state], dim=1)
        if m.dt_norm is not None:  # Jamba: RMSNorm over the feature axis, which is dim 1 here
            norm = self._k_norm.rms_norm
            dt_low = norm(dt_low.transpose(1, 2), m.dt_norm.weight, m.dt_norm.eps).transpose(1, 2)
            B = norm(B.transpose(1, 2), m.B_norm.weight, m.B_norm.eps).transpose(1, 2)
            C = norm(C.transpose(1, 2), m.C_norm.weight, m.C_norm.eps).transpose(1, 2)
        dt = _rowwise_mm(m.dt_proj.weight.expand(Bsz, -1, -1), dt_low)  # (B, di, L)
        if valid is not None:  # softplus(-inf) = 0: pad steps leave the state untouched
            dt = torch.where(valid[:, None, :], dt, torch.full_like(dt, float("-inf")))
        y, ssm_state = self._k_scan.selective_scan(xc, dt, layer.A, B, C, layer.D, z, delta_bias=layer.dt_bias,
                                                   delta_softplus=True, initial_state=ssm_state)
        out = _rowwise_mm(y.transpose(1, 2), m.out_proj.weight.t().expand(Bsz, -1, -1))  # (B, L, d), no copy of y
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

    def _empty_state(self, Bsz) -> OrderedDict[str, torch.Tensor]:
        """The attention layers' KV caches (zeros, kv_dtype, max_seq_len slots) and pos; the Mamba states start as
        None (zeros) and come from the first chunk."""
        tensors = OrderedDict()
        for spec in state_specs(self.config, self.dtype):
            if spec.name.endswith((".key", ".value")):
                tensors[spec.name] = torch.zeros(spec.concrete_shape(Bsz), dtype=self.kv_dtype, device=self.device)
            elif spec.name == "pos":
                tensors["pos"] = torch.zeros(Bsz, dtype=torch.int64, device=self.device)
            else:
                tensors[spec.name] = None
        return tensors

    def _prefill_body(self, ids, host_lengths=None):
        """-> (last-position logits (B, V) fp32, state tensors), the prompt in chunks of prefill_chunk tokens.
        host_lengths: each row's real length when rows are left-padded (None: no padding). No host syncs: it is also
        captured (prefill_graphs)."""
        Bsz, L = ids.shape
        tensors = self._empty_state(Bsz)
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

    # ------------------------------------------------------------------ step
    def _mamba_step(self, layer, x, conv_state, ssm_state):
        m = layer.mamba
        di = m.d_inner
        sp = layer.sparse or {}
        if "in_proj" in sp:  # SCAP: sparse GEMV, then the conv update on its own
            xz = self._sparse_linear(x, sp["in_proj"])
            xc, _ = self._k_conv.causal_conv1d_update(xz[:, :di], conv_state, layer.conv_weight, m.conv1d.bias,
                                                      "silu")
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
            return self._partial_sum(self._sparse_linear(y, sp["out_proj"]))
        return self._partial_sum(self._linear(y, m.out_proj.weight, m.out_proj.bias))

    def _persistent_for(self, st: FastState, trace: bool = False):
        """The persistent step's launcher over st's state tensors (its block table points at them); trace: it records
        program 0's phase timeline (benchmarks/trace_persistent.py)."""
        from ..kernels import decode_persistent as kp

        t, cfg = st.tensors, self.config
        blocks = []
        spec = {"d": cfg.d_model, "eps": self.eps, "in_bias": False, "conv_bias": False, "out_bias": False,
                "router_bias": False, "router": "sigmoid_top1", "activation": "silu", "d_inner": 1, "dt_rank": 1,
                "d_state": 1, "d_conv": 1, "n_experts": 1, "ffn": 1}
        for layer in self.layers:
            i = layer.index
            if layer.mixer == "mamba":
                m = layer.mamba
                blocks.append({"kind": kp.MAMBA, "norm_w": layer.mixer_norm, "in_w": m.in_proj.weight,
                               "in_b": m.in_proj.bias, "conv_state": t[f"L{i}.conv"], "conv_w": layer.conv_weight,
                               "conv_b": m.conv1d.bias, "xproj_w": m.x_proj.weight, "dtproj_w": m.dt_proj.weight,
                               "dt_bias": layer.dt_bias, "A": layer.A, "D": layer.D, "ssm_state": t[f"L{i}.ssm"],
                               "out_w": m.out_proj.weight, "out_b": m.out_proj.bias})
                spec.update(d_inner=m.d_inner, dt_rank=m.dt_rank, d_state=m.d_state, d_conv=m.d_conv,
                            in_bias=m.in_proj.bias is not None, conv_bias=m.conv1d.bias is not None,
                            out_bias=m.out_proj.bias is not None)
            else:
                moe = layer.moe
                blocks.append({"kind": kp.MOE, "norm_w": layer.ffn_norm, "router_w": moe.router.weight,
                               "router_b": moe.router.bias, "w1": moe.w1, "w2": moe.w2})
                spec.update(n_experts=moe.w1.shape[0], ffn=moe.w2.shape[2], router=moe.router_kind,
                            top_k=moe.top_k, activation=moe.activation, router_bias=moe.router.bias is not None)
        table = kp.block_table(blocks, self.device, self.dtype)
        return kp.PersistentDecode(spec, table, self.model.embedding.weight, trace=trace)

    def _step_body(self, st: FastState):
        """One decode step on st's static buffers: reads st.tokens, updates st.tensors and st.residual in place,
        writes st.logits. Everything here is capturable (no host syncs, no allocations that depend on values)."""
        if st.persistent is not None:  # batch 1: every block in one launch, then the final norm and the head
            pending, residual = st.persistent(st.tokens)
            self._head(residual, pending, out=st.logits)
            return
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
        if self.persistent and st.batch == 1 and st.persistent is None:  # (not inside a capture: it copies the table)
            st.persistent = self._persistent_for(st)

    def _capture(self, st: FastState):
        """Warm up (compiles every kernel) on a throwaway copy of the state, then capture the step over st's buffers.
        Capturing runs nothing, so st is not advanced."""
        scratch = st.clone()
        if st.persistent is not None:
            scratch.persistent = self._persistent_for(scratch)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._step_body(scratch)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step_body(st)
        st.graph = graph

    def adopt(self, state) -> FastState:
        """A FastState holding copies of another runner's state ({name: tensor})."""
        tensors = OrderedDict()
        batch = None
        for spec in state_specs(self.config, self.dtype):
            if spec.name not in state:
                raise InputError(f"state is missing {spec.name!r}")
            value = torch.as_tensor(state[spec.name])
            dtype = self.kv_dtype if spec.name.endswith((".key", ".value")) else spec.dtype
            tensors[spec.name] = value.to(device=self.device, dtype=dtype).contiguous().clone()
            batch = value.shape[0]
        filled = int(tensors["pos"].max()) if "pos" in tensors else 0
        return FastState(tensors, batch, filled)

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

    # ------------------------------------------------------------------ runner interface
    def synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def state_to_torch(self, state) -> dict:
        return dict(state.tensors) if isinstance(state, FastState) else dict(state)

    def describe(self):
        import triton

        d = self.device
        return {"backend": self.backend, "device": str(d), "dtype": str(self.dtype).replace("torch.", ""),
                "torch": torch.__version__, "triton": triton.__version__, "mambadeploy": __version__,
                "cuda_graph": self.use_cuda_graph, "triton_gemv": self.triton_gemv,
                # programmatic dependent launch of the decode kernels (sm_90+, unless MAMBADEPLOY_PDL=0)
                "pdl": bool(self._k_gemv.pdl_launch(torch.empty(0, device=d))),
                "l2_prefetch": ",".join(s for s in L2_PREFETCH_SITES if s in self.l2_prefetch) or "none",
                "persistent": self.persistent,
                "kernels": "Triton" if d.type == "cuda" else "Triton (CPU interpreter)",
                "gpu": torch.cuda.get_device_name(d) if d.type == "cuda" else None}


def _rowwise_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (B, M, K) @ b (B, K, N) -> (B, M, N) contiguous, one plain GEMM per batch row written in place; either side
    may be any strided or broadcast (expanded weight) view. Used for W @ x^T with channel-major outputs and for
    y^T @ W^T from a channel-major y: torch.matmul of a 2-D weight by a 3-D tensor computes the transposed product
    and copies it back into this layout (on the H100 those copies were 1.7 of the 2.8B's 10.4 ms of prefill kernels at
    2048 tokens), and F.linear copies a non-contiguous input of several rows first."""
    out = torch.empty(a.shape[0], a.shape[1], b.shape[2], dtype=a.dtype, device=a.device)
    for i in range(a.shape[0]):
        torch.mm(a[i], b[i], out=out[i])
    return out


def check_device(device) -> None:
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise MambaDeployError(f"device {device!r}: this torch ({torch.__version__}) sees no CUDA device")
