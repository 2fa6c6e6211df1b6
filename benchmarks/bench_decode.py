"""Decode benchmark on the GPU: ms per token (one step for the whole batch) of torch-fast vs the torch-eager reference,
BlackMamba-1.5B and -2.8B shapes (seeded random weights), bf16, batch 1 / 8 / 64.

Per case: first a check (both runners prefill the same prompt and follow the eager runner's greedy tokens for 16 steps:
top-1 agreement and the max logit error relative to the logit scale are recorded), then the timings:
- fast_gpu_ms: GPU time of one captured decode step (CUDA events around each graph replay, median of 50);
- fast_host_us: host cost of one runner.step() call (token copy, graph launch, logits clone; input check off), no sync;
- fast_wall_ms: step() + synchronize, median (what a generation loop sees);
- eager_ms: the reference runner's step + synchronize, median.
Bytes actually read per token: every weight of the Mamba layers, router and norms, the chosen experts only (counted from
the routing of a real step: distinct experts per MoE layer), the LM head (tied embedding: the whole matrix) and the
embedding rows, plus the recurrent state read and written. Roofline % = those bytes / fast_gpu_ms over the H100
datasheet bandwidth (3.35 TB/s); the copy rate measured in the same run is reported beside it.

Run: python benchmarks/bench_decode.py [--presets blackmamba-2.8b] [--batches 1 8 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _bench import device_facts, host_us_per_call, measured_ceilings, table, write_json

from mambadeploy.models.checkpoint import build_preset
from mambadeploy.runtime.torch_eager import TorchEagerRunner
from mambadeploy.runtime.torch_fast import TorchFastRunner
from mambadeploy.validate.tolerances import rel_to_scale


def weight_bytes_read(model, routing) -> tuple[int, dict]:
    """Bytes of weights one decode step reads: all non-expert parameters except the embedding (its rows are
    negligible; the tied head reads the whole matrix, counted once), plus each MoE layer's distinct chosen experts."""
    parts = {"mamba": 0, "experts": 0, "router_norms": 0, "head": 0}
    chosen = {layer: int(experts.unique().numel()) for layer, experts in routing}
    for i, block in enumerate(model.layers):
        if block.mixer is not None:
            parts["mamba"] += sum(p.numel() * p.element_size() for p in block.mixer.parameters())
        for norm in (block.mixer_norm, block.ffn_norm):
            if norm is not None:
                parts["router_norms"] += sum(p.numel() * p.element_size() for p in norm.parameters())
        if block.ffn is not None:
            moe = block.ffn
            parts["router_norms"] += sum(p.numel() * p.element_size() for p in moe.router.parameters())
            per_expert = (moe.w1[0].numel() + moe.w2[0].numel()) * moe.w1.element_size()
            parts["experts"] += per_expert * chosen[i]
    head = model.embedding.weight if model.lm_head is None else model.lm_head.weight
    parts["head"] = head.numel() * head.element_size() + sum(
        p.numel() * p.element_size() for p in model.final_norm.parameters())
    return sum(parts.values()), parts


def state_bytes(state) -> int:
    return sum(t.numel() * t.element_size() for t in state.tensors.values()) * 2  # read + write


def median_wall_ms(fn, reps):
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_case(model, preset, batch, ceil, eager_reps):
    V = model.config.vocab_size
    g = torch.Generator(device="cuda").manual_seed(batch)
    prompt = torch.randint(0, V, (batch, 16), generator=g, device="cuda")
    fast = TorchFastRunner(model, check_inputs=False)
    eager = TorchEagerRunner(model)

    # check: follow the eager runner's greedy tokens
    lf, sf = fast.prefill(prompt)
    le, se = eager.prefill(prompt)
    agree, total, worst = 0, 0, rel_to_scale(lf, le)[0]
    for _ in range(16):
        agree += int((lf.argmax(-1) == le.argmax(-1)).sum())
        total += batch
        token = le.argmax(-1)
        lf, sf = fast.step(token, sf)
        le, se = eager.step(token, se)
        worst = max(worst, rel_to_scale(lf, le)[0])
    row = {"preset": preset, "batch": batch, "check_top1_agreement": agree / total, "check_max_rel_err": worst}

    # bytes actually read: routing of one real step, recorded by an eager (ungraphed) fast runner on a copy
    tracer = TorchFastRunner(model, use_cuda_graph=False, check_inputs=False)
    tracer.routing_trace = []
    tracer.step(token, sf.clone())
    weights, parts = weight_bytes_read(model, tracer.routing_trace)
    total_bytes = weights + state_bytes(sf)
    row.update({"bytes_per_token": total_bytes, "bytes_parts": parts, "state_bytes": state_bytes(sf)})

    # timings
    token = torch.randint(0, V, (batch,), generator=g, device="cuda")
    for _ in range(3):
        fast.step(token, sf)
    times = []
    for _ in range(50):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        sf.graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    row["fast_gpu_ms"] = statistics.median(times)
    row["fast_host_us"] = host_us_per_call(lambda: fast.step(token, sf), calls=20)
    row["fast_wall_ms"] = median_wall_ms(lambda: fast.step(token, sf), 20)
    row["eager_ms"] = median_wall_ms(lambda: eager.step(token, se), eager_reps)
    row["speedup_vs_eager"] = row["eager_ms"] / row["fast_wall_ms"]
    row["roofline_pct_spec"] = 100 * total_bytes / (row["fast_gpu_ms"] * 1e-3) / ceil["hbm_spec_bytes_per_s"]
    row["roofline_pct_copy"] = 100 * total_bytes / (row["fast_gpu_ms"] * 1e-3) / ceil["copy_bytes_per_s"]
    row["floor_ms_spec"] = total_bytes / ceil["hbm_spec_bytes_per_s"] * 1e3
    print(row, flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["blackmamba-1.5b", "blackmamba-2.8b"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--eager-reps", type=int, default=5)
    parser.add_argument("--name", default="decode")
    args = parser.parse_args()
    facts, ceil = device_facts(), measured_ceilings()
    print(facts, ceil, flush=True)
    rows = []
    for preset in args.presets:
        model = build_preset(preset, dtype=torch.bfloat16, device="cuda")
        with torch.no_grad():
            for batch in args.batches:
                rows.append(bench_case(model, preset, batch, ceil, args.eager_reps))
                torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()
    write_json(args.name, {"device": facts, "ceilings": ceil, "dtype": "bf16", "rows": rows})
    print(table(rows, ["preset", "batch", "fast_gpu_ms", "fast_wall_ms", "fast_host_us", "eager_ms", "speedup_vs_eager",
                       "bytes_per_token", "floor_ms_spec", "roofline_pct_spec", "roofline_pct_copy",
                       "check_top1_agreement", "check_max_rel_err"]))


if __name__ == "__main__":
    main()
