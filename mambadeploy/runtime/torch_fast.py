"""torch-fast backend: the reference model's own weights run on the Triton kernels (mambadeploy/kernels), with dense
projections through torch (cuBLAS; at batch-1 decode the Triton GEMV of kernels/gemv.py, switch `triton_gemv`),
and the decode step captured in a CUDA graph.

TorchFastRunner is assembled from units with one job each:
- fast_layers.py: each block's weights prepared once for the kernels (FastLayer);
- fast_blocks.py: the pieces prefill and step share (norms, dense / sparse projections, feed-forward, head) and the
  two hooks a sharded rank fills in (`_partial_sum`, `_expert_mix`: parallel/fast.py);
- fast_prefill.py: sequence kernels (causal_conv1d, selective_scan, add_rms_norm, route_hidden + expert_gather), the LM
  head on the last position only; long prompts in chunks of `prefill_chunk` tokens (the Mamba layers carry their
  conv/SSM state from chunk to chunk, the attention layers append to the KV cache, so peak memory follows the chunk);
- fast_step.py: one token per row on the step kernels (causal_conv1d_update, selective_state_update update the state
  IN PLACE). On a GPU the whole step is captured once per state object into a CUDA graph over that state's own buffers
  and replayed afterwards; each state owns its buffers, so two sequences never alias;
- fast_state.py: FastState, the tensors under the names of models/state.py. step() ADVANCES THE STATE IT IS GIVEN (in
  place) and returns that same object; a state from another runner (a plain {name: tensor} mapping) is copied in;
- fast_attention.py (Jamba): prefill through F.scaled_dot_product_attention, decode through the length-aware Triton
  kernel (kernels/decode_attention.py), which reads only the filled KV slots.
This file holds the choices (constructor, settings) and the runner interface.
On CPU the kernels run in Triton's interpreter (kernels/interpret.py), without CUDA graphs: slow, for tests on the
tiny presets only.
"""

from __future__ import annotations

import torch

from .. import __version__, settings
from ..errors import ConfigError, MambaDeployError, lazy_import
from ..models.model import MambaMoELM
from .base import Runner
from .fast_blocks import TRITON_GEMV_MAX_BATCH, FastBlocks
from .fast_layers import prepare_layer
from .fast_prefill import FastPrefill
from .fast_sparse import FastSparse, site_table
from .fast_state import FastState, adopt_state
from .fast_step import FUSED_DT_MAX_BATCH, FastStep

__all__ = ["FUSED_DT_MAX_BATCH", "KV_DTYPES", "L2_PREFETCH_SITES", "PREFILL_CHUNK_DEFAULT", "TRITON_GEMV_MAX_BATCH",
           "FastState", "TorchFastRunner", "check_device", "prefetch_sites"]

# L2 prefetch sites of the batch-1 decode step (Hopper; kernels/common.l2_prefetch): a kernel warms L2 with the weights
# of a kernel that runs after it, so that HBM keeps streaming through the short kernels and launch gaps in between.
#   xproj: the x_proj GEMV (a short kernel) prefetches out_proj's weight, read two launches later.
# Measured and dropped (H100, 2.8B batch 1, results/archive/decode_l2pf_*.json): the expert fc1 GEMV prefetching
# the same expert's fc2 weights (0.854 -> 0.889 ms) and fc2 prefetching 8 MB of the next layer's in_proj (-> 0.896):
# both compete with a kernel that already streams at full rate.
# Chosen by TorchFastRunner(l2_prefetch=...), else the l2_prefetch setting (settings.py, MAMBADEPLOY_L2_PREFETCH):
# "1"/"all", "0"/"none", or a comma list.
L2_PREFETCH_SITES = ("xproj",)


# Prompt tokens per prefill chunk (TorchFastRunner(prefill_chunk=...), CLI --prefill-chunk). Peak activation memory of
# prefill is set by the chunk, not the prompt; 8K tokens keep every GEMM long (the suggestion; the GPU run of
# benchmarks/long_context.py measures the memory it takes).
PREFILL_CHUNK_DEFAULT = 8192

# KV-cache element types torch-fast accepts (TorchFastRunner(kv_dtype=...), CLI --kv-dtype): "model" keeps the model
# dtype; fp8 (e4m3, unscaled: values past +-448 saturate) halves a bf16 cache, at the error in
# validate/tolerances.KV_FP8_LOGITS_REL.
KV_DTYPES = {"model": None, "fp8": torch.float8_e4m3fn}


def prefetch_sites(spec: str | None) -> frozenset:
    """The L2 prefetch sites named by spec (None: the l2_prefetch setting, settings.py; default all)."""
    spec = settings.current().l2_prefetch if spec is None else spec
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


class TorchFastRunner(FastPrefill, FastStep, FastSparse, FastBlocks, Runner):
    backend = "torch-fast"

    def __init__(self, model: MambaMoELM, use_cuda_graph: bool = True, check_inputs: bool = True,
                 prefill_graphs: bool = False, triton_gemv: bool = True, l2_prefetch: str | None = None,
                 prefill_chunk: int = PREFILL_CHUNK_DEFAULT, kv_dtype: str = "model", scap_sites=None):
        """use_cuda_graph: capture each state's decode step (CUDA only). prefill_graphs: also capture prefill once per
        prompt shape without padding (memory for each shape's activations stays reserved; for benchmarks and fixed
        shapes). check_inputs: check token ids on every step (a device sync when they are on the GPU).
        triton_gemv: the dense decode projections on the Triton GEMV at batch <= TRITON_GEMV_MAX_BATCH (else cuBLAS).
        l2_prefetch: the L2 prefetch sites of the batch-1 step (see L2_PREFETCH_SITES; None: the l2_prefetch setting,
        MAMBADEPLOY_L2_PREFETCH, default all; an argument always wins over the setting); Hopper only, a hint that
        changes no result.
        prefill_chunk: prompt tokens per prefill chunk (see PREFILL_CHUNK_DEFAULT).
        kv_dtype: the attention KV cache's element type, a key of KV_DTYPES.
        scap_sites: which kernel each SCAP site of a sparse checkpoint runs in decode (fast_sparse.site_table: None =
        the measured default table, "shipped", a kernel name, or a mapping of overrides)."""
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
            sparse_gemv_compact,
        )

        self._k_conv, self._k_moe, self._k_route, self._k_norm = causal_conv1d, moe_experts, moe_routing, rms_norm
        self._k_scan, self._k_ssu, self._k_gemv = selective_scan, selective_state_update, gemv
        self._k_attn = decode_attention
        if int(prefill_chunk) < 1:
            raise ConfigError(f"prefill chunk must be at least 1 token, got {prefill_chunk}")
        if kv_dtype not in KV_DTYPES:
            raise ConfigError(f"unknown KV cache dtype {kv_dtype!r}; choose one of {', '.join(KV_DTYPES)}")
        self.prefill_chunk = int(prefill_chunk)
        self._k_sparse, self._k_compact = sparse_gemv, sparse_gemv_compact
        self.sparse = bool(model.config.sparsity.get("sites"))  # SCAP checkpoint: per-site kernels in decode
        self.scap_sites = "default" if scap_sites is None else scap_sites
        self.scap_table = site_table(scap_sites) if self.sparse else None
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
        self.layers = [prepare_layer(i, block, self.config, self.scap_table) for i, block in enumerate(model.layers)]
        self.l2_prefetch = prefetch_sites(l2_prefetch)
        self.eps = self.config.norm_eps


    def adopt(self, state) -> FastState:
        """A FastState holding copies of another runner's state ({name: tensor})."""
        return adopt_state(self.config, self.dtype, self.kv_dtype, self.device, state)

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
                "scap_sites": (self.scap_sites if isinstance(self.scap_sites, str) else "override")
                if self.sparse else None,
                # programmatic dependent launch of the decode kernels (sm_90+, unless the pdl setting is off)
                "pdl": bool(self._k_gemv.pdl_launch(torch.empty(0, device=d))),
                "l2_prefetch": ",".join(s for s in L2_PREFETCH_SITES if s in self.l2_prefetch) or "none",
                "kernels": "Triton" if d.type == "cuda" else "Triton (CPU interpreter)",
                "gpu": torch.cuda.get_device_name(d) if d.type == "cuda" else None}


def check_device(device) -> None:
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise MambaDeployError(f"device {device!r}: this torch ({torch.__version__}) sees no CUDA device")
