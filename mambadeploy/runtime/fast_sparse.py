"""torch-fast's SCAP decode, site by site: each sparsified projection runs the kernel its entry in a small table names,
so that enabling SCAP never makes a decode step slower than the dense one where a sparse kernel does not pay.

Kernels a site can run (decode rows, batch <= MAX_BATCH; the numbers are always the sparse reference's):
- "dense":      the dense decode kernels with SCAP's sparsifier fused into their input loads (kernels/gemv.py
                `sparsify=`, kernels/moe_experts.expert_gather `sparse=`): the dense kernel's bytes and launch count
                (in_proj keeps its fused conv epilogue), the sparse model's numbers. A site whose sparsifier is the
                identity (mode 0, threshold < 0: calibrated at target 0) runs the plain dense path, bit for bit.
- "predicated": kernels/sparse_gemv.py, the first SCAP kernel (loads of dropped rows masked off) — what torch-fast ran
                at every site before this table ("shipped"; in_proj's conv then runs on its own).
- "compact":    kernels/sparse_gemv_compact.py (each program lists its chunk's kept rows, then reads only those).
The MoE layer decides once for its two expert GEMVs (group "experts", at the lower target of the two).

The table maps (group, batch) to (kernel, min_target, reason): the kernel runs when the site's calibrated target
sparsity is >= min_target, else "dense"; an identity site runs "dense" unless min_target < 0 (a forced table: the
benchmark's "shipped" path runs its kernel everywhere, as the code before this table did).
TorchFastRunner(scap_sites=...) overrides the table (benchmarks/scap_decode.py A/Bs "shipped", the default and a table
built from its own per-site timings): see `site_table`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..models import sparsity

KERNELS = ("dense", "predicated", "compact")
GROUPS = ("in_proj", "x_proj", "out_proj", "experts")
MAX_BATCH = 4  # decode batches the sparse kernels take (kernels/sparse_gemv.MAX_BATCH); above, the reference's math

_SWEEP = "H200, 2.8B, b1, target 0.5 (benchmarks/results/archive/sweep_sparse_gemv_compacting_b1_nvidia_h200.json)"
_WIDE = ("unmeasured at batch 2-4: a weight row is read when any row keeps it (rows read 0.89 at target 0.5, batch 4, "
         "scap_decode_h200.json) and batch 1 already lost")
# (group, batch) -> (kernel, min_target, reason). Defaults from the archived sweep; benchmarks/scap_decode.py writes
# the table its own per-site timings give (each case's "table_measured", from "sites") for the next update of this one.
_EXPERTS_B1 = (f"{_SWEEP}: fc1 best compacting 8.75 us vs 12.65, fc2 7.03 vs 12.06; that sweep's dense was one GEMV a "
               "pair plus torch glue (cat, GELU, scale), not torch-fast's fused expert GEMVs, and only target 0.5 was "
               "measured")
_EXPERTS_WIDE = ("unmeasured at batch 2-4: the dense grouped GEMM reads each chosen expert once for all its "
                 "pairs, the sparse kernels once per pair; dense until scap_decode.py measures it")
SITE_KERNELS: dict[tuple[str, int], tuple[str, float, str]] = {
    ("in_proj", 1): ("dense", 0.0, f"{_SWEEP}: dense 4.86 us, best compacting 7.86, predicated 13.65 (+ the conv)"),
    ("x_proj", 1): ("dense", 0.0, f"{_SWEEP}: dense 2.01 us, best sparse 2.88, predicated 7.56"),
    ("out_proj", 1): ("dense", 0.0, f"{_SWEEP}: dense 4.00 us, best compacting 6.90, predicated 9.51"),
    ("experts", 1): ("compact", 0.5, _EXPERTS_B1),
    **{(g, b): ("dense", 0.0, _WIDE) for g in ("in_proj", "x_proj", "out_proj") for b in (2, 3, 4)},
    **{("experts", b): ("dense", 0.0, _EXPERTS_WIDE) for b in (2, 3, 4)},
}
# Tiles of the compacting expert GEMVs on a GPU: the sweep's best configs at the 2.8B sites (fc1 with the gated
# activation in its epilogue, fc2 with the routing scale), as launch_config overrides.
EXPERT_TILES = {"fc1": {"block_n": 256, "chunk_k": 128, "block_j": 32, "num_warps": 4, "num_stages": 3,
                        "use_dot": True},   # dot-n256-k128-j32-w4-s3: 8.75 us
                "fc2": {"block_n": 128, "chunk_k": 128, "block_j": 32, "num_warps": 4, "num_stages": 1,
                        "use_dot": False}}  # fma-n128-k128-j32-w4-s1: 7.03 us


def site_table(spec=None) -> dict:
    """The (group, batch) -> (kernel, min_target, reason) table for spec: None or "default" (SITE_KERNELS); a kernel
    name ("shipped" = "predicated"): that kernel at every site and batch; a mapping {group or (group, batch): kernel
    or (kernel, min_target)} applied over the default (the benchmark's measured table)."""
    table = dict(SITE_KERNELS)
    if spec is None or spec == "default":
        return table
    if isinstance(spec, str):
        kernel = "predicated" if spec == "shipped" else spec
        if kernel not in KERNELS:
            raise ConfigError(f"unknown SCAP site kernel {spec!r}; choose default, shipped or one of {KERNELS}")
        return {key: (kernel, -1.0, f"forced: {spec}") for key in table}
    for key, value in dict(spec).items():
        kernel, min_target = (value, 0.0) if isinstance(value, str) else tuple(value)[:2]
        keys = [key] if isinstance(key, tuple) else [(key, b) for b in range(1, MAX_BATCH + 1)]
        if kernel not in KERNELS or any(k not in table for k in keys):
            raise ConfigError(f"SCAP site table entry {key!r}: {value!r} (groups {GROUPS}, batch 1-{MAX_BATCH}, "
                              f"kernels {KERNELS})")
        table.update({k: (kernel, float(min_target), "override") for k in keys})
    return table


@dataclass
class SparseSite:
    """One sparsified projection as torch-fast runs it: the model's weight (dense GEMV layout: (N, K), experts
    (E, out, in)), the transposed copy a sparse kernel reads (None when no batch's choice needs it), mode, threshold,
    calibrated target, and the merged bias (the linear's own + the folded W·(m·1)), or None."""
    weight: torch.Tensor
    wt: torch.Tensor | None
    mode: float
    threshold: float
    target: float
    bias: torch.Tensor | None

    @property
    def identity(self) -> bool:
        """Calibrated at target 0: |x − 0| > t < 0 keeps every entry, so the site is the dense projection exactly."""
        return self.mode == 0.0 and self.threshold < 0 and self.bias is None


def choose(table: dict, group: str, batch: int, target: float, identity: bool = False) -> str:
    """The kernel a site of `group` at calibrated `target` runs for `batch` decode rows (identity: the site's
    sparsifier keeps everything, mode 0)."""
    kernel, min_target, _ = table[(group, batch)]
    if target < min_target or (identity and min_target >= 0):
        kernel = "dense"
    return kernel


def prepare_sites(block, index: int, config, table: dict) -> dict | None:
    """The SparseSites of model block `index` (Mamba projections by name, MoE "fc1" / "fc2", None for an expert GEMV
    that is not sparsified); transposed weights only where some batch's choice is a sparse kernel."""
    chosen = config.sparsity.get("sites", {})
    out = {}
    mixer, ffn = block.mixer, block.ffn
    if block.kind.mixer == "mamba" and mixer.sparse is not None:
        for name, sp in mixer.sparse.items():
            lin = getattr(mixer, name)
            bias = lin.bias if sp.folded_bias is None else (
                sp.folded_bias if lin.bias is None else lin.bias + sp.folded_bias)
            target = float(chosen[f"L{index}.{name}"]["target"])
            site = SparseSite(lin.weight, None, sp.mode, sp.threshold, target, bias)
            if any(choose(table, name, b, target, identity=site.identity) != "dense" for b in range(1, MAX_BATCH + 1)):
                site.wt = lin.weight.t().contiguous()
            out[name] = site
    if block.kind.ffn == "moe" and ffn.sparse is not None:
        for name, w in (("fc1", ffn.w1), ("fc2", ffn.w2)):
            sp = ffn.sparse[name] if name in ffn.sparse else None  # noqa: SIM401 (ModuleDict has no get)
            target = float(chosen[f"L{index}.{name}"]["target"]) if sp is not None else 0.0
            out[name] = None if sp is None else SparseSite(w, None, sp.mode, sp.threshold, target, sp.folded_bias)
        target, identity = _experts_target(out["fc1"], out["fc2"])
        batches = range(1, MAX_BATCH + 1)
        if any(choose(table, "experts", b, target, identity) != "dense" for b in batches):
            for name, w in (("fc1", ffn.w1), ("fc2", ffn.w2)):
                site = out[name] or SparseSite(w, None, 0.0, -1.0, 0.0, None)  # unsparsified: every row kept
                site.wt = w.transpose(1, 2).contiguous()
                out[name] = site
    return out or None


def _experts_target(fc1, fc2) -> tuple[float, bool]:
    """An MoE layer's (target, identity) for the table: the lower target of its non-identity expert GEMVs; identity
    when neither sparsifies anything."""
    live = [s for s in (fc1, fc2) if s is not None and not s.identity]
    return min((s.target for s in live), default=0.0), not live


class FastSparse:
    """Mixed into TorchFastRunner: SCAP's decode projections by the per-site table (self.scap_table)."""

    def _site_kernel(self, group, site: SparseSite, rows: int) -> str:
        return "dense" if rows > MAX_BATCH else choose(self.scap_table, group, rows, site.target,
                                                       identity=site.identity)

    def _sparse_linear(self, x, group, site: SparseSite, prefetch=None):
        """The sparsified projection of decode rows x (B, K) -> (B, N) in the model dtype, on the site's kernel."""
        kernel = self._site_kernel(group, site, x.shape[0])
        sparsify = None if site.identity else (site.mode, site.threshold)
        if kernel == "dense" and self._on_gemv(x):
            return self._k_gemv.gemv(x, site.weight, site.bias, sparsify=sparsify, prefetch=prefetch)
        if kernel == "dense":
            return F.linear(x if sparsify is None else sparsity.sparsify_ref(x, *sparsify), site.weight, site.bias)
        module = self._k_compact if kernel == "compact" else self._k_sparse
        return module.sparse_gemv(x, site.wt, site.mode, site.threshold, site.bias)

    def _sparse_in_proj(self, x, site: SparseSite, conv_state, conv_weight, conv_bias):
        """in_proj of decode rows x, SCAP-sparse, and Mamba's decode conv on its x half (the state shifts in place):
        -> (xz (B, 2 d_inner), xc (B, d_inner)). The conv runs in the GEMV's epilogue where the kernel has one (the
        dense GEMV, the compacting one), else after it, as the shipped path did."""
        conv = (conv_state, conv_weight, conv_bias)
        kernel = self._site_kernel("in_proj", site, x.shape[0])
        if kernel == "dense" and self._on_gemv(x):
            xz = self._k_gemv.gemv(x, site.weight, site.bias, conv=conv,
                                   sparsify=None if site.identity else (site.mode, site.threshold))
        elif kernel == "compact":
            xz = self._k_compact.sparse_gemv(x, site.wt, site.mode, site.threshold, site.bias, conv=conv)
        else:
            xz = self._sparse_linear(x, "in_proj", site)
            xc, _ = self._k_conv.causal_conv1d_update(xz[:, :conv_weight.shape[0]], conv_state, conv_weight,
                                                      conv_bias, "silu")
            return xz, xc
        return xz, xz[:, :conv_weight.shape[0]]

    def _sparse_experts(self, layer, x, weights, experts):
        """The chosen experts of decode rows x (T, d), SCAP-sparse, -> (T, d) in the model dtype."""
        moe = layer.moe
        fc1, fc2 = layer.sparse["fc1"], layer.sparse["fc2"]
        T, k = experts.shape
        target, identity = _experts_target(fc1, fc2)
        kernel = "dense" if T > MAX_BATCH else choose(self.scap_table, "experts", T, target, identity)
        if kernel == "dense" and identity:  # nothing sparsified: the dense experts, bit for bit
            return self._expert_mix(x, moe, experts, weights)
        if T > MAX_BATCH:  # the reference's static gather, sparse
            return sparsity.sparse_moe_ref(x, moe.router.weight, moe.router.bias, moe.w1, moe.w2, moe.router_kind,
                                           moe.top_k, moe.activation, moe.sparse)
        if kernel == "dense":  # the dense expert kernels with the sparsifiers in their input loads
            spec = tuple(None if s is None or s.identity else (s.mode, s.threshold, s.bias) for s in (fc1, fc2))
            return self._k_moe.expert_gather(x, moe.w1, moe.w2, experts, weights, moe.activation, sparse=spec)
        flat = experts.reshape(-1)
        rows = x.repeat_interleave(k, 0) if k > 1 else x
        if kernel == "predicated":  # the shipped path: GEMV, torch glue, GEMV, combine
            h = self._k_sparse.sparse_expert_gemv(rows, fc1.wt, flat, fc1.mode, fc1.threshold, fc1.bias)
            gate, up = h.chunk(2, dim=-1)
            from ..models import ref_ops

            a = (ref_ops.activation_ref(gate, moe.activation) * up).contiguous()
            y = self._k_sparse.sparse_expert_gemv(a, fc2.wt, flat, fc2.mode, fc2.threshold, fc2.bias)
        else:  # compact: fc1's epilogue applies the gated activation, top-1 fc2's the routing weight
            tiles = EXPERT_TILES if x.is_cuda else {"fc1": None, "fc2": None}
            a = self._k_compact.sparse_expert_gemv(rows, fc1.wt, flat, fc1.mode, fc1.threshold, fc1.bias,
                                                   activation=moe.activation, tiles=tiles["fc1"])
            if k == 1:
                return self._k_compact.sparse_expert_gemv(a, fc2.wt, flat, fc2.mode, fc2.threshold, fc2.bias,
                                                          scale=weights.reshape(-1), tiles=tiles["fc2"])
            y = self._k_compact.sparse_expert_gemv(a, fc2.wt, flat, fc2.mode, fc2.threshold, fc2.bias,
                                                   tiles=tiles["fc2"])
        return (y.float() * weights.reshape(-1, 1).float()).view(T, k, -1).sum(1).to(x.dtype)
