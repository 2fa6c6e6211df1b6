"""Where the batch-1 decode step's GPU time goes, kernel by kernel, inside the real captured step (GPU).

A per-kernel profile of an ungraphed step (bench_decode.py --profile) gives each kernel's own duration with PDL off;
the real step is a CUDA graph whose kernels overlap under PDL. Here replays of the captured step itself are profiled
(torch profiler: CUPTI records every kernel of the graph with its start and end) and each kernel gets a role from its
name and place in the layer (the GEMVs of a Mamba layer in order: in_proj (+conv), x_proj, out_proj). Per role:
- `incr_us`: how far the kernel moves the step's end (its end minus the previous kernel's end): these add up to the
  step's span, so they say where the critical path goes;
- `dur_us`: start to end (under PDL this includes time parked at the wait, so the durations overlap);
- `gap_us`: its start minus the previous kernel's end (negative: it started early, under PDL);
- `gbps`: its weight bytes over incr_us (the weight-streaming kernels only).
Medians over the Mamba+MoE layers of the last profiled replay. Each --l2-prefetch spec gets its own runner, its step's
GPU time (events around 50 replays, median) and its timeline.
Each variant is an L2 prefetch spec of the runner (runtime/torch_fast.py L2_PREFETCH_SITES), e.g. `all none`. All
variants are timed before any is profiled: once the profiler has run in a process, every graph replay after it is
slower (seen: +40 us a step on the H100).

Run: python benchmarks/timeline_decode.py [--preset blackmamba-2.8b] [--variants all none]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from _bench import captured_decode_step, device_facts, gpu_ms, table, write_json

from mambadeploy.models.checkpoint import build_preset

LAYER_START = "add_rms_norm_kernel"  # the mixer norm opens each layer (the FFN norm is add_rms_norm_route_kernel)
GEMV_ROLES = ("in_proj", "x_proj", "out_proj")
SHORT = {"selective_state_update_kernel": "state_update", "add_rms_norm_route_kernel": "norm_route",
         "moe_gemv_fc1_kernel": "fc1", "moe_gemv_fc2_kernel": "fc2", LAYER_START: "norm"}


def kernel_events(replay, replays: int = 3) -> list[dict]:
    """The kernels of the last of `replays` profiled replays, sorted by start: {name, ts, end} in us."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            replay()
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    kernels = sorted(({"name": e["name"], "ts": float(e["ts"]), "end": float(e["ts"]) + float(e["dur"])}
                      for e in trace["traceEvents"] if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    if not kernels or len(kernels) % replays:
        raise RuntimeError(f"profiler saw {len(kernels)} kernels over {replays} replays (expected a multiple)")
    return kernels[-len(kernels) // replays:]


def label(kernels: list[dict]) -> None:
    """Sets each kernel's role and layer (-1 before the first layer norm and for the head's kernels after the last)."""
    layer, gemvs = -1, 0
    for k in kernels:
        short = next((v for key, v in SHORT.items() if k["name"].startswith(key)), None)
        if short == "norm":
            layer, gemvs = layer + 1, 0
        if k["name"].startswith("gemv_kernel"):
            short = GEMV_ROLES[gemvs] if gemvs < len(GEMV_ROLES) else "head_gemv"
            gemvs += 1
        k["role"] = short or k["name"][:48]
        k["layer"] = layer
    # the step ends with the final norm (the norm kernel again) and the LM head (the GEMV again)
    gemv_at = [i for i, k in enumerate(kernels) if k["name"].startswith("gemv_kernel")]
    if gemv_at:
        kernels[gemv_at[-1]].update(role="head_gemv", layer=-1)
        norms = [i for i, k in enumerate(kernels[:gemv_at[-1]]) if k["role"] == "norm"]
        if norms:
            kernels[norms[-1]].update(role="final_norm", layer=-1)


def role_bytes(model) -> dict:
    """Weight bytes each streaming role reads at batch 1 (one expert for fc1 / fc2)."""
    block = next(b for b in model.layers if b.kind.mixer == "mamba")
    m, moe = block.mixer, next(b.ffn for b in model.layers if b.kind.ffn == "moe")

    def nbytes(t):
        return t.numel() * t.element_size()

    head = model.embedding.weight if model.lm_head is None else model.lm_head.weight
    return {"in_proj": nbytes(m.in_proj.weight), "x_proj": nbytes(m.x_proj.weight), "out_proj": nbytes(m.out_proj.weight),
            "fc1": nbytes(moe.w1[0]), "fc2": nbytes(moe.w2[0]), "head_gemv": nbytes(head)}


def summarise(kernels: list[dict], nbytes: dict) -> list[dict]:
    prev_end = kernels[0]["ts"]
    for k in kernels:
        k["incr"], k["gap"], k["dur"] = k["end"] - prev_end, k["ts"] - prev_end, k["end"] - k["ts"]
        prev_end = max(prev_end, k["end"])
    roles: dict = {}
    for k in kernels:
        roles.setdefault(k["role"], []).append(k)
    rows = []
    span = kernels[-1]["end"] - kernels[0]["ts"]
    for role, ks in roles.items():
        ks = [k for k in ks if k["layer"] >= 0] or ks
        incr = statistics.median(k["incr"] for k in ks)
        row = {"role": role, "launches": len(ks), "incr_us": incr, "dur_us": statistics.median(k["dur"] for k in ks),
               "gap_us": statistics.median(k["gap"] for k in ks), "total_incr_us": sum(k["incr"] for k in ks),
               "share_pct": 100 * sum(k["incr"] for k in ks) / span}
        if role in nbytes and incr > 0:
            row["gbps"] = nbytes[role] / (incr * 1e-6) / 1e9
        rows.append(row)
    rows.sort(key=lambda r: -r["total_incr_us"])
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="blackmamba-2.8b")
    parser.add_argument("--variants", nargs="+", default=["all"], help="L2 prefetch specs")
    parser.add_argument("--name", default="timeline_decode")
    args = parser.parse_args()
    facts = device_facts()
    model = build_preset(args.preset, dtype=torch.bfloat16, device="cuda")
    nbytes = role_bytes(model)
    results, steps, reference = [], [], None
    with torch.no_grad():
        for variant in args.variants:  # all timed first (see the docstring)
            runner, state, _ = captured_decode_step(model, l2_prefetch=variant)
            steps.append((variant, runner, state))
            described = runner.describe()
            state.graph.replay()
            logits = state.logits.clone()
            reference = logits if reference is None else reference
            results.append({"preset": args.preset, "variant": variant, "l2_prefetch": described["l2_prefetch"],
                            # the same prompt and steps: the hints must leave the logits exactly as they were
                            "max_logit_diff_vs_first": (logits - reference).abs().max().item(),
                            "step_gpu_ms": gpu_ms(state.graph.replay, reps=50, warmup=0)})
            print(results[-1], flush=True)
        for row, (variant, runner, state) in zip(results, steps):
            kernels = kernel_events(state.graph.replay)
            label(kernels)
            rows = summarise(kernels, nbytes)
            span = kernels[-1]["end"] - kernels[0]["ts"]
            row.update({"profiled_span_us": span, "kernels": len(kernels), "roles": rows})
            print(f"== {args.preset} {variant} (l2_prefetch={row['l2_prefetch']}): "
                  f"step {row['step_gpu_ms']:.4f} ms (events), profiled span {span:.1f} us, {len(kernels)} kernels",
                  flush=True)
            print(table(rows, ["role", "launches", "incr_us", "dur_us", "gap_us", "total_incr_us", "share_pct",
                               "gbps"]), flush=True)
    print(table(results, ["variant", "l2_prefetch", "step_gpu_ms", "profiled_span_us",
                          "max_logit_diff_vs_first"]))
    write_json(args.name, {"device": facts, "dtype": "bf16", "batch": 1, "results": results})


if __name__ == "__main__":
    main()
