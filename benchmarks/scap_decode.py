"""SCAP decode benchmark (H200): how much of a BlackMamba-2.8B decode step the sparse GEMVs save, at batch 1 and 4,
sparsity 0 / 0.5 / 0.7 on every sparsified projection (Mamba in_proj, x_proj, out_proj; the chosen experts' fc1, fc2),
beside dense torch-fast measured in the same run.

What is measured (bf16, seeded random weights; thresholds are the target-quantiles of |x| over the inputs each site
sees in a 4 x 64-token reference forward pass: mode 0, which is what decides speed):
- dense_step_ms: GPU time of one captured torch-fast decode step of the dense model (CUDA-graph replay, median of 50);
- sparse_step_ms: the same for the sparse model (torch-fast launches kernels/sparse_gemv.py for in_proj, x_proj,
  out_proj and the chosen experts' fc1/fc2 at batch <= 4; target 0 = threshold -1: every row read, i.e. the sparse
  kernels' own overhead against the dense ones); speedup = dense / sparse; below_floor: batch 1 under the dense
  floor, 1.27 GB per token / 4.8 TB/s = 0.264 ms;
- per site, on the inputs that site really sees: the dense torch-fast GEMV (kernels/gemv.py, weight (N, K)) and the
  sparse GEMV (weight transposed (K, N), mask fused), GPU time per call from CUDA-graph replays, and the share of weight
  rows read (a row is read when any row of the batch keeps that input feature).
Memory: each sparse copy holds the weights twice (the model's and the transposed ones); one copy at a time.

GPU:     python benchmarks/scap_decode.py --out $OUT/scap_decode.json
CPU dry run (tiny preset, Triton interpreter, meaningless times; checks the script end to end):
         PYTHONPATH=$PWD python benchmarks/scap_decode.py --dry-run --out /tmp/scap_decode.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mambadeploy.kernels.gemv import gemv
from mambadeploy.kernels.sparse_gemv import sparse_expert_gemv, sparse_gemv
from mambadeploy.models import sparsity
from mambadeploy.models.calibrate import NO_THRESHOLD, _values, collect, fold, threshold_for
from mambadeploy.models.checkpoint import build_preset
from mambadeploy.validate.svg import line_chart

FLOOR_MS = 0.264  # BlackMamba-2.8B, batch 1: 1.27 GB per token at the H200's 4.8 TB/s (docs FACTS)
GROUPS = ("in_proj", "x_proj", "out_proj", "fc1", "fc2")


def timer(dry: bool):
    if dry:
        def cpu_ms(fn, calls=1, reps=3):
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
        return cpu_ms
    from _bench import graph_ms_per_call

    return lambda fn, calls=50, reps=10: graph_ms_per_call(fn, calls=calls, reps=reps)


def site_inputs(model, chosen, batch: int, seed: int = 0) -> dict:
    """Decode-like inputs of each site: `batch` rows of what the site sees (rows of a reference forward)."""
    g = torch.Generator().manual_seed(seed)
    windows = torch.randint(0, model.config.vocab_size, (4, 64), generator=g).to(model.device)
    stats = collect(model, windows, chosen, batch=4)
    return {name: rows for name, rows in stats.items()}


def step_ms(model, batch: int, dry: bool) -> float:
    """Time of one torch-fast decode step of `batch` rows: GPU time of its CUDA-graph replay (median of 50); on the
    CPU dry run the wall time of one interpreted step."""
    from mambadeploy.runtime.torch_fast import TorchFastRunner

    runner = TorchFastRunner(model, check_inputs=False, use_cuda_graph=not dry)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (batch, 16), generator=g).to(model.device)
    logits, state = runner.prefill(prompt)
    token = logits.argmax(-1)
    for _ in range(3):  # the first step captures the graph
        runner.step(token, state)
    if dry:
        t0 = time.perf_counter()
        runner.step(token, state)
        return (time.perf_counter() - t0) * 1e3
    from _bench import gpu_ms

    torch.cuda.synchronize()
    replay = state.graph.replay if state.graph is not None else (lambda: runner.step(token, state))
    return gpu_ms(replay, reps=50)


def sparse_copy(model, chosen, rows, target: float):
    """The model with every chosen site sparsified at `target` (mode 0: speed does not depend on the mode; target 0:
    threshold −1, every row read: the sparse kernels' own overhead)."""
    sites = {}
    for name, group, *_ in chosen:
        t = threshold_for(_values(rows[name]), 0.0, target) if target > 0 else NO_THRESHOLD
        sites[name] = {"group": group, "mode": 0.0, "threshold": t, "target": target, "mode_kind": "zero"}
    config = copy.deepcopy(model.config)
    config.sparsity = {"method": "scap", "target": target, "mode": "zero", "sites": sites}
    config.validate()
    return fold(model, config)


def site_kernels(model, chosen, rows, batch, target, ms, device, dtype) -> list[dict]:
    """Per site: the dense torch-fast GEMV and the sparse GEMV on that site's real inputs, and the rows read."""
    per_site = []
    for name, group, where, _ in chosen:
        module = getattr(model.layers[int(name[1:].split(".")[0])], where)
        values = rows[name]
        t = threshold_for(_values(values), 0.0, target) if target > 0 else NO_THRESHOLD
        x = values[:batch].to(dtype).contiguous()
        if group in ("fc1", "fc2"):
            w = module.w1 if group == "fc1" else module.w2  # (E, out, in)
            wt = w.transpose(1, 2).contiguous()
            chosen_ids = [i % w.shape[0] for i in range(batch)]  # distinct experts, as a batch reaches; host ints:
            experts = torch.tensor(chosen_ids, device=device)  # no device read inside a captured graph
            d = ms(lambda x=x, w=w, ids=chosen_ids: [gemv(x[i:i + 1], w[e]) for i, e in enumerate(ids)])
            s = ms(lambda x=x, wt=wt, e=experts, t=t: sparse_expert_gemv(x, wt, e, 0.0, t))
        else:
            w = getattr(module, group).weight
            wt = w.t().contiguous()
            d = ms(lambda x=x, w=w: gemv(x, w))
            s = ms(lambda x=x, wt=wt, t=t: sparse_gemv(x, wt, 0.0, t))
        per_site.append({"site": name, "dense_ms": d, "sparse_ms": s, "threshold": t,
                         "rows_read": float((x.float().abs() > t).any(0).float().mean())})
    return per_site


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="blackmamba-2.8b")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--sparsity", default="0,0.5,0.7")
    p.add_argument("--out", required=True, help="JSON path (the plot is written beside it as .svg)")
    p.add_argument("--dry-run", action="store_true", help="CPU: blackmamba-tiny, fp32, interpreter")
    args = p.parse_args(argv)
    dry = args.dry_run or not torch.cuda.is_available()
    preset, device, dtype = ("blackmamba-tiny", "cpu", torch.float32) if dry else (args.preset, "cuda", torch.bfloat16)
    ms = timer(dry)
    model = build_preset(preset, dtype=dtype, device=device)
    chosen = [s for s in sparsity.sites(model.config) if s[1] in GROUPS]
    batches = [int(b) for b in args.batches.split(",")]
    targets = [float(t) for t in args.sparsity.split(",")]
    with torch.no_grad():
        rows = site_inputs(model, chosen, max(batches))
    result = {"schema": "mambadeploy.scap_decode/2", "preset": preset, "dtype": str(dtype), "dry_run": dry,
              "device": {"gpu": torch.cuda.get_device_name(0) if not dry else "cpu (dry run)"},
              "floor_ms_batch1": FLOOR_MS, "cases": []}
    for batch in batches:
        dense_step = step_ms(model, batch, dry)
        print(json.dumps({"batch": batch, "dense_torch_fast_step_ms": dense_step}), flush=True)
        for target in targets:
            sparse_model = sparse_copy(model, chosen, rows, target)
            sparse_step = step_ms(sparse_model, batch, dry)
            del sparse_model
            per_site = site_kernels(model, chosen, rows, batch, target, ms, device, dtype)
            dense_sum = sum(r["dense_ms"] for r in per_site)
            sparse_sum = sum(r["sparse_ms"] for r in per_site)
            case = {"batch": batch, "target": target, "dense_step_ms": dense_step, "sparse_step_ms": sparse_step,
                    "speedup": dense_step / sparse_step, "below_floor": bool(batch == 1 and sparse_step < FLOOR_MS),
                    "dense_gemv_ms": dense_sum, "sparse_gemv_ms": sparse_sum,
                    "rows_read_mean": statistics.mean(r["rows_read"] for r in per_site), "sites": per_site}
            result["cases"].append(case)
            print(json.dumps({k: v for k, v in case.items() if k != "sites"}), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    key = "sparse_step_ms"
    series = {f"batch {b}": [(c["target"], c[key]) for c in result["cases"] if c["batch"] == b] for b in batches}
    out.with_suffix(".svg").write_text(line_chart(series, f"SCAP decode ({preset}, {result['device']['gpu']})",
                                                  "target sparsity", key.replace("_", " "), log_y=False))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
