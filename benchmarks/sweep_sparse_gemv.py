"""SCAP sparse GEMV sweep (H200): the compacting sparse GEMV (mambadeploy/kernels/sparse_gemv.py) over a small config
sweep, beside the dense torch-fast GEMV (kernels/gemv.py) and the first, predicated sparse GEMV
(benchmarks/_sparse_gemv_v1.py), at the BlackMamba-2.8B shapes, in one run.

Sites (the preset's shapes): in_proj, x_proj, out_proj (weight (N, K) for the dense GEMV, transposed (K, N) for the
sparse ones) and one expert's fc1 / fc2 per (token, slot) pair (the batch's pairs on distinct experts; dense: one
GEMV a pair, as scap_decode.py times it). The expert sites as torch-fast's sparse path runs them: fc1 with the gated
GELU, fc2 times the routing weight, in the new kernel's epilogue; dense and v1 followed by those torch ops. Batch 1 and 4; sparsity 0 / 0.5 / 0.7: random normal activations (bf16)
with the threshold at that quantile of |x| (mode 0; 0 = threshold -1, every row read: the kernels' own overhead).
Every config is first checked against sparse_gemv_ref / sparse_expert_gemv_ref (the op tolerances of
validate/tolerances.py); one that fails is recorded and not timed. Times: GPU ms per call from CUDA-graph replays
(_bench.graph_ms_per_call, 50 calls a graph, median of 10 replays). Per case: rows read (a row is read when any
batch row keeps it), GB/s of the bytes read (the dense GEMV: all of the weight; sparse: the rows read), the best new
config and the default (launch_config's own choice), and speedups vs dense and vs v1. The summary adds the per-site
times up as a 2.8B decode step has them (18 Mamba layers, 18 MoE layers). The device facts and the measured copy
ceiling are in the JSON.

GPU:     python benchmarks/sweep_sparse_gemv.py --out $OUT/sweep_sparse_gemv.json      (~5-8 min, mostly compiles)
CPU dry run (Triton interpreter, tiny shapes, a few configs; checks the script end to end, times mean nothing):
         PYTHONPATH=$PWD python benchmarks/sweep_sparse_gemv.py --dry-run --out /tmp/sweep_sparse_gemv.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import zlib
from pathlib import Path

if "--dry-run" in sys.argv:  # before triton is imported: every kernel (the v1 baseline's too) runs interpreted
    os.environ["TRITON_INTERPRET"] = "1"

import torch
import torch.nn.functional as F
from triton.runtime.errors import TritonError

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _sparse_gemv_v1 as v1
from _bench import device_facts, graph_ms_per_call, measured_ceilings, table, write_json

from mambadeploy.kernels.gemv import gemv
from mambadeploy.kernels.sparse_gemv import (
    launch_config,
    sparse_expert_gemv,
    sparse_expert_gemv_ref,
    sparse_gemv,
    sparse_gemv_ref,
)
from mambadeploy.models.presets import preset_config
from mambadeploy.validate.tolerances import assert_close_op

# (BLOCK_N, BLOCK_J, warps, stages) tried at each of three K chunk sizes (launch_config's, half, double). Triton
# pipelines only the tl.dot loop (compiled for sm_90: async copies), so the FMA tiles vary stages once; DOT_TILES also
# run at batch 1 (x padded to 16 rows: MMA work is free next to the weight stream, and the loads get pipelined).
FMA_TILES = [(256, 32, 8, 1), (256, 16, 4, 1), (256, 32, 4, 1), (256, 64, 8, 1), (128, 32, 4, 1), (512, 32, 8, 1),
             (512, 16, 8, 1), (256, 32, 8, 3)]
DOT_TILES = [(128, 32, 4, 3), (256, 32, 4, 3), (64, 32, 4, 3), (128, 64, 4, 3), (256, 64, 8, 3), (128, 32, 4, 1)]


def site_shapes(preset: str, dry: bool) -> dict:
    """{site: (K, N, expert count or 0)} of the preset (dry run: tiny stand-ins with odd widths)."""
    if dry:
        return {"in_proj": (48, 100, 0), "x_proj": (96, 13, 0), "fc1": (40, 50, 3), "fc2": (72, 40, 3)}
    c = preset_config(preset)
    d, m, e = c.d_model, c.mamba, c.moe
    return {"in_proj": (d, 2 * m.d_inner, 0), "x_proj": (m.d_inner, m.dt_rank + 2 * m.d_state, 0),
            "out_proj": (m.d_inner, d, 0), "fc1": (d, 2 * e.ffn_size, e.n_experts),
            "fc2": (e.ffn_size, d, e.n_experts)}


def configs(K: int, N: int, B: int, groups: int, dry: bool) -> list[tuple[str, dict]]:
    """(name, launch config): launch_config's default first, then the sweep; the predicated loop at the default."""
    base = launch_config(K, N, B, groups, interpreted=dry)
    c0 = base["constexprs"]
    out = [("default", base), ("default-predicated", launch_config(K, N, B, groups, dry, compact=False))]
    if dry:
        return out + [("dry-wide", launch_config(K, N, B, groups, dry, block_n=32, chunk_k=64)),
                      ("dry-dot", launch_config(K, N, B, groups, dry, chunk_k=32, block_j=16, use_dot=True))]
    tiles = [(t, True) for t in DOT_TILES] + ([] if c0["USE_DOT"] else [(t, False) for t in FMA_TILES])
    for (block_n, block_j, warps, stages), use_dot in tiles:
        for chunk_k in sorted({c0["CHUNK_K"], max(32, c0["CHUNK_K"] // 2), c0["CHUNK_K"] * 2}):
            if block_j > chunk_k or -(-K // chunk_k) > 128:
                continue
            name = f"{'dot' if use_dot else 'fma'}-n{block_n}-k{chunk_k}-j{block_j}-w{warps}-s{stages}"
            out.append((name, launch_config(K, N, B, groups, block_n=block_n, chunk_k=chunk_k, block_j=block_j,
                                             num_warps=warps, num_stages=stages, use_dot=use_dot)))
    return out


def timer(dry: bool):
    if not dry:
        return lambda fn: graph_ms_per_call(fn, calls=50, reps=10)

    def cpu_ms(fn):
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return cpu_ms


def run_case(site, K, N, experts, B, target, dtype, device, ms, dry) -> dict:
    g = torch.Generator(device=device).manual_seed(zlib.crc32(f"{site} {B}".encode()))
    x = torch.randn(B, K, generator=g, device=device).to(dtype)
    threshold = float(torch.quantile(x.float().abs().flatten().cpu(), target)) if target > 0 else -1.0
    rows_read = float((x.float().abs() > threshold).any(0).float().mean())
    if experts:
        w = (torch.randn(experts, N, K, generator=g, device=device) * K ** -0.5).to(dtype)  # (E, out, in)
        wt = w.transpose(1, 2).contiguous()
        ids = [i % experts for i in range(B)]  # host ints: no device read inside a captured graph
        e = torch.tensor(ids, device=device)
        # as the runner runs the site: fc1 with the gated GELU, fc2 scaled by the routing weight (top-1); the new
        # kernel fuses them (one launch), the dense GEMV and v1 are followed by the torch ops the old runner ran
        extra = {"activation": "gelu"} if site == "fc1" else {"scale": torch.rand(B, generator=g, device=device)}
        glue = (lambda h: F.gelu(h[:, :N // 2]) * h[:, N // 2:]) if site == "fc1" else \
            (lambda h: (h.float() * extra["scale"][:, None]).to(dtype))
        dense = lambda: glue(torch.cat([gemv(x[i:i + 1], w[j]) for i, j in enumerate(ids)]))
        old = lambda: glue(v1.sparse_expert_gemv(x, wt, e, 0.0, threshold))
        new = lambda cfg: sparse_expert_gemv(x, wt, e, 0.0, threshold, config=cfg, **extra)
        ref = sparse_expert_gemv_ref(x, wt, e, 0.0, threshold, **extra)
        rows, groups, pairs = 1, B, B
    else:
        w = (torch.randn(N, K, generator=g, device=device) * K ** -0.5).to(dtype)
        wt = w.t().contiguous()
        dense = lambda: gemv(x, w)
        old = lambda: v1.sparse_gemv(x, wt, 0.0, threshold)
        new = lambda cfg: sparse_gemv(x, wt, 0.0, threshold, config=cfg)
        ref = sparse_gemv_ref(x, wt, 0.0, threshold)
        rows, groups, pairs = B, 1, 1
    row_bytes = N * x.element_size()
    dense_bytes, sparse_bytes = pairs * K * row_bytes, pairs * rows_read * K * row_bytes
    case = {"site": site, "K": K, "N": N, "batch": B, "target": target, "threshold": threshold,
            "rows_read": rows_read, "dense_ms": ms(dense), "v1_ms": ms(old), "configs": []}
    out_cols = N // 2 if site == "fc1" else N  # fc1's epilogue writes act(gate) * up
    for name, cfg in configs(K, out_cols, rows, groups, dry):
        entry = {"name": name, "grid": list(cfg["grid"]), "num_warps": cfg["num_warps"],
                 "num_stages": cfg["num_stages"], **cfg["constexprs"]}
        try:
            assert_close_op(new(cfg), ref, dtype, what=f"{site} b{B} t{target} {name}")
            entry["ok"] = True
            entry["ms"] = ms(lambda cfg=cfg: new(cfg))
        except (AssertionError, RuntimeError, TritonError) as err:  # wrong, or refused (e.g. out of shared memory)
            entry.update(ok=False, error=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            print(f"{site} b{B} t{target} {name}: {entry['error']}", flush=True)
        case["configs"].append(entry)
    timed = [c for c in case["configs"] if c["ok"]]
    best = min(timed, key=lambda c: c["ms"]) if timed else None
    default = next((c for c in timed if c["name"] == "default"), None)
    case.update(best=best and best["name"], best_ms=best and best["ms"], default_ms=default and default["ms"],
                dense_gb_s=dense_bytes / case["dense_ms"] / 1e6,
                best_gb_s=best and sparse_bytes / best["ms"] / 1e6,
                speedup_vs_dense=best and case["dense_ms"] / best["ms"],
                speedup_vs_v1=best and case["v1_ms"] / best["ms"])
    return case


def summary(cases: list[dict], per_step: dict) -> list[dict]:
    """Per (batch, target): the sites' times added up as one decode step runs them (per_step: site -> count)."""
    rows = []
    for key in sorted({(c["batch"], c["target"]) for c in cases}):
        mine = [c for c in cases if (c["batch"], c["target"]) == key]
        def add(field, mine=mine):
            return sum(per_step[c["site"]] * (c[field] or float("nan")) for c in mine)
        rows.append({"batch": key[0], "target": key[1], "dense_ms": add("dense_ms"), "v1_ms": add("v1_ms"),
                     "new_default_ms": add("default_ms"), "new_best_ms": add("best_ms"),
                     "rows_read_mean": statistics.mean(c["rows_read"] for c in mine)})
        rows[-1]["speedup_best_vs_dense"] = rows[-1]["dense_ms"] / rows[-1]["new_best_ms"]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="blackmamba-2.8b")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--sparsity", default="0,0.5,0.7")
    p.add_argument("--sites", default=None, help="comma-separated subset of in_proj,x_proj,out_proj,fc1,fc2")
    p.add_argument("--out", default=None, help="JSON path (default: $OUT or benchmarks/results/, via write_json)")
    p.add_argument("--dry-run", action="store_true", help="CPU: Triton interpreter, tiny shapes, a few configs")
    args = p.parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        p.error("needs a CUDA GPU (or --dry-run)")
    device, dtype, ms = ("cpu" if dry else "cuda"), torch.bfloat16, timer(dry)
    shapes = site_shapes(args.preset, dry)
    if args.sites:
        shapes = {s: shapes[s] for s in args.sites.split(",")}
    layers = preset_config(args.preset).layers
    per_step = {s: sum(1 for spec in layers if (spec.mixer if s in ("in_proj", "x_proj", "out_proj") else spec.ffn)
                       in ("mamba", "moe")) for s in shapes}
    result = {"schema": "mambadeploy.sweep_sparse_gemv/1", "preset": args.preset, "dtype": str(dtype), "dry_run": dry,
              "device": {"gpu": "cpu (dry run)"} if dry else device_facts(),
              "ceilings": {} if dry else measured_ceilings(), "sites": shapes, "per_step": per_step, "cases": []}
    with torch.no_grad():
        for B in (int(b) for b in args.batches.split(",")):
            for target in (float(t) for t in args.sparsity.split(",")):
                for site, (K, N, experts) in shapes.items():
                    case = run_case(site, K, N, experts, B, target, dtype, device, ms, dry)
                    result["cases"].append(case)
                    print(json.dumps({k: v for k, v in case.items() if k != "configs"}), flush=True)
    result["summary"] = summary(result["cases"], per_step)
    print(table(result["summary"], list(result["summary"][0])))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {out}")
    else:
        write_json("sweep_sparse_gemv", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
