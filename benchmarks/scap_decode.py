"""SCAP decode benchmark (H200): dense torch-fast against the SCAP-sparse model on three per-site kernel tables, in one
run: BlackMamba-2.8B shape, batch 1 and 4, sparsity 0 / 0.5 / 0.7 on every sparsified projection (Mamba in_proj,
x_proj, out_proj; the chosen experts' fc1, fc2).

What is measured (bf16, seeded random weights; thresholds are the target-quantiles of |x| over the inputs each site
sees in a 4 x 64-token reference forward pass: mode 0, which is what decides speed; target 0 = threshold −1):
- steps (ms): GPU time of one captured torch-fast decode step (CUDA-graph replay, median of 50) of
    dense              the dense model;
    shipped            the sparse model with every site on the predicated kernel (kernels/sparse_gemv.py), the path
                       torch-fast ran before the per-site table (TorchFastRunner(scap_sites="shipped"));
    per_site           the default table (runtime/fast_sparse.SITE_KERNELS);
    per_site_measured  the table this run's per-site timings give: each group on its fastest kernel at this batch and
                       target (the "table_measured" of the case);
  speedup = dense / variant; below_floor: under the decode floor (the bytes a batch-1 dense step reads / 4.8 TB/s;
  and / the measured copy rate, floor_ms_measured);
- per site group (the first layer's site, on the inputs it really sees), GPU time per call of each kernel as the
  runner runs it (TorchFastRunner with that kernel forced; dense = the dense kernel with the sparsifier fused, in_proj
  with its conv epilogue; experts = the MoE layer's two expert kernels + combine, the batch's pairs on distinct
  experts), the dense model's own kernels (dense_model_ms), and the share of weight rows read (a row is read when any row of the batch keeps it);
- ceilings: the measured device copy rate and bf16 matmul (benchmarks/_bench.measured_ceilings) and the datasheet.
Memory: the sparse model holds the weights twice (a folded copy) plus the transposed copies of the runners that need
them; one sparse model at a time.

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mambadeploy.models import sparsity
from mambadeploy.models.calibrate import NO_THRESHOLD, _values, collect, fold, threshold_for
from mambadeploy.models.checkpoint import build_preset
from mambadeploy.runtime.fast_sparse import KERNELS
from mambadeploy.validate.svg import line_chart

HBM_SPEC_BYTES_PER_S = 4.8e12  # H200 datasheet (docs FACTS): the floor, 1.27 GB / 4.8 TB/s = 0.264 ms
GROUPS = ("in_proj", "x_proj", "out_proj", "fc1", "fc2")  # the sparsified sites (config groups)
SITE_GROUPS = ("in_proj", "x_proj", "out_proj", "experts")  # the per-site table's groups (fc1 + fc2 = experts)
VARIANTS = ("dense", "shipped", "per_site", "per_site_measured")


def timer(dry: bool):
    if dry:
        def cpu_ms(fn, calls=1, reps=2):
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(times)
        return cpu_ms
    from _bench import graph_ms_per_call

    return lambda fn: graph_ms_per_call(fn, calls=50, reps=10)


def decode_bytes(model) -> int:
    """Weight bytes one batch-1 decode step reads: every parameter once, of each MoE layer's experts only top_k."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for block in model.layers:
        moe = block.ffn if block.kind.ffn == "moe" else None
        if moe is not None:
            expert_bytes = sum(w.numel() * w.element_size() for w in (moe.w1, moe.w2))
            total -= expert_bytes * (moe.w1.shape[0] - moe.top_k) // moe.w1.shape[0]
    return total


def step_ms(model, batch: int, dry: bool, **runner_kwargs) -> float:
    """One torch-fast decode step of `batch` rows: GPU time of its CUDA-graph replay (median of 50); on the CPU dry
    run the wall time of one interpreted step."""
    from mambadeploy.runtime.torch_fast import TorchFastRunner

    runner = TorchFastRunner(model, check_inputs=False, use_cuda_graph=not dry, **runner_kwargs)
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
    return gpu_ms(state.graph.replay, reps=50)


def sparse_copy(model, chosen, rows, target: float):
    """The model with every chosen site sparsified at `target` (mode 0: speed does not depend on the mode; target 0:
    threshold −1, every row read: the sparse kernels' own overhead, or the dense path where the table runs it)."""
    sites = {}
    for name, group, *_ in chosen:
        t = threshold_for(_values(rows[name]), 0.0, target) if target > 0 else NO_THRESHOLD
        sites[name] = {"group": group, "mode": 0.0, "threshold": t, "target": target, "mode_kind": "zero"}
    config = copy.deepcopy(model.config)
    config.sparsity = {"method": "scap", "target": target, "mode": "zero", "sites": sites}
    config.validate()
    return fold(model, config)


def first_sites(model) -> dict:
    """{group: layer index} of the first Mamba layer and the first MoE layer."""
    mamba = next(i for i, b in enumerate(model.layers) if b.kind.mixer == "mamba")
    moe = next(i for i, b in enumerate(model.layers) if b.kind.ffn == "moe")
    return {"in_proj": mamba, "x_proj": mamba, "out_proj": mamba, "experts": moe}


def site_calls(runner, layers: dict, rows: dict, batch: int, device, dtype) -> dict:
    """{group: a no-argument call of that group's projection as `runner` runs it, on the site's own inputs}."""
    i_m, i_e = layers["in_proj"], layers["experts"]
    lm, le = runner.layers[i_m], runner.layers[i_e]
    m = lm.mamba
    x_in = rows[f"L{i_m}.in_proj"][:batch].to(device, dtype).contiguous()
    x_xp = rows[f"L{i_m}.x_proj"][:batch].to(device, dtype).contiguous()
    x_op = rows[f"L{i_m}.out_proj"][:batch].to(device, dtype).contiguous()
    x_e = rows[f"L{i_e}.fc1"][:batch].to(device, dtype).contiguous()
    conv_state = torch.zeros(batch, m.d_inner, lm.conv_weight.shape[1], dtype=torch.float32, device=device)
    E = le.moe.w1.shape[0]
    experts = torch.tensor([[i % E] for i in range(batch)], device=device)  # distinct experts, as a batch reaches
    weights = torch.rand(batch, 1, generator=torch.Generator().manual_seed(2)).to(device)
    if lm.sparse is None:  # the dense model: its own kernels
        return {"in_proj": lambda: runner._k_gemv.gemv(x_in, m.in_proj.weight, m.in_proj.bias,
                                                       conv=(conv_state, lm.conv_weight, m.conv1d.bias))
                if runner._on_gemv(x_in) else runner._linear(x_in, m.in_proj.weight, m.in_proj.bias),
                "x_proj": lambda: runner._linear(x_xp, m.x_proj.weight),
                "out_proj": lambda: runner._linear(x_op, m.out_proj.weight, m.out_proj.bias),
                "experts": lambda: runner._expert_mix(x_e, le.moe, experts, weights)}
    return {"in_proj": lambda: runner._sparse_in_proj(x_in, lm.sparse["in_proj"], conv_state, lm.conv_weight,
                                                      m.conv1d.bias),
            "x_proj": lambda: runner._sparse_linear(x_xp, "x_proj", lm.sparse["x_proj"]),
            "out_proj": lambda: runner._sparse_linear(x_op, "out_proj", lm.sparse["out_proj"]),
            "experts": lambda: runner._sparse_experts(le, x_e, weights, experts)}


def per_site(model, sparse_model, rows, batch, ms, device, dtype, read_share: dict) -> list[dict]:
    """Per site group: each kernel's time as the runner runs it, the dense model's, and the rows read."""
    from mambadeploy.runtime.torch_fast import TorchFastRunner

    layers = first_sites(model)
    times = {g: {} for g in SITE_GROUPS}
    dense = TorchFastRunner(model, check_inputs=False, use_cuda_graph=False)
    dense_calls = site_calls(dense, layers, rows, batch, device, dtype)
    for kernel in KERNELS:
        runner = TorchFastRunner(sparse_model, check_inputs=False, use_cuda_graph=False, scap_sites=kernel)
        for group, call in site_calls(runner, layers, rows, batch, device, dtype).items():
            times[group][kernel] = ms(call)
        del runner
    out = []
    for group in SITE_GROUPS:
        names = ["fc1", "fc2"] if group == "experts" else [group]
        read = [read_share[f"L{layers[group]}.{n}"] for n in names if f"L{layers[group]}.{n}" in read_share]
        out.append({"group": group, "layer": layers[group], "kernels_ms": times[group],
                    "dense_model_ms": ms(dense_calls[group]),
                    "fastest": min(times[group], key=times[group].get),
                    "rows_read": statistics.mean(r for r in read) if read else None})
    return out


def rows_read(sparse_model, rows, batch) -> dict:
    """{site: share of weight rows a batch of `batch` site inputs needs} at the sparse model's thresholds."""
    sites = sparse_model.config.sparsity["sites"]
    return {name: float((rows[name][:batch].float().abs() > s["threshold"]).any(0).float().mean())
            for name, s in sites.items()}


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
        rows = collect(model, torch.randint(0, model.config.vocab_size, (4, 64),
                                            generator=torch.Generator().manual_seed(0)).to(device), chosen, batch=4)
    nbytes = decode_bytes(model)
    result = {"schema": "mambadeploy.scap_decode/3", "preset": preset, "dtype": str(dtype), "dry_run": dry,
              "decode_bytes_batch1": nbytes, "floor_ms_batch1": nbytes / HBM_SPEC_BYTES_PER_S * 1e3, "cases": []}
    if not dry:
        from _bench import device_facts, measured_ceilings

        result["device"], result["ceilings"] = device_facts(), measured_ceilings()
        result["floor_ms_measured"] = nbytes / result["ceilings"]["copy_bytes_per_s"] * 1e3
    else:
        result["device"] = {"gpu": "cpu (dry run)"}
    with torch.no_grad():
        for batch in batches:
            dense_step = step_ms(model, batch, dry)
            print(json.dumps({"batch": batch, "dense_step_ms": dense_step}), flush=True)
            for target in targets:
                sparse_model = sparse_copy(model, chosen, rows, target)
                read_share = rows_read(sparse_model, rows, batch)
                sites = per_site(model, sparse_model, rows, batch, ms, device, dtype, read_share)
                measured = {(s["group"], batch): s["fastest"] for s in sites}
                steps = {"dense": dense_step,
                         "shipped": step_ms(sparse_model, batch, dry, scap_sites="shipped"),
                         "per_site": step_ms(sparse_model, batch, dry),
                         "per_site_measured": step_ms(sparse_model, batch, dry, scap_sites=measured)}
                del sparse_model
                case = {"batch": batch, "target": target, "steps_ms": steps,
                        "speedup_vs_dense": {k: dense_step / v for k, v in steps.items()},
                        "below_floor": {k: bool(batch == 1 and v < result["floor_ms_batch1"])
                                        for k, v in steps.items()},
                        "rows_read_mean": statistics.mean(read_share.values()),
                        "table_measured": {g: k for (g, _), k in measured.items()}, "sites": sites}
                result["cases"].append(case)
                print(json.dumps({k: v for k, v in case.items() if k != "sites"}), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    series = {f"{v} b{b}": [(c["target"], c["steps_ms"][v]) for c in result["cases"] if c["batch"] == b]
              for b in batches for v in VARIANTS}
    out.with_suffix(".svg").write_text(line_chart(series, f"SCAP decode ({preset}, {result['device']['gpu']})",
                                                  "target sparsity", "step ms", log_y=False))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
