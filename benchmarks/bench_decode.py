"""Decode benchmark on the GPU: ms per token (one step for the whole batch) of torch-fast vs the torch-eager reference,
BlackMamba-1.5B and -2.8B shapes (seeded random weights), bf16, batch 1 / 8 / 64.

Checks first: per preset, in fp32 (where both runners compute the same function up to summation order), torch-fast
follows the eager runner's greedy tokens for 16 steps from a 16-token prompt at batch 2 (top-1 agreement, max logit
error / scale); per bf16 case the same numbers are recorded (bf16 eager and torch-fast round differently, e.g. the
fused router keeps fp32 logits, so near-tie routes flip and these random-weight models amplify a flip). Then timings:
- fast_gpu_ms: GPU time of one captured decode step (CUDA events around each graph replay, median of 50);
- fast_host_us: host cost of one runner.step() call (token copy, graph launch, logits clone; input check off), no sync;
- fast_wall_ms: step() + synchronize, median (what a generation loop sees);
- eager_ms: the reference runner's step + synchronize, median.
Bytes actually read per token: every weight of the Mamba layers, router and norms, the chosen experts only (counted from
the routing of a real step: distinct experts per MoE layer), the LM head (tied embedding: the whole matrix) and the
embedding rows, plus the recurrent state read and written. Roofline % = those bytes / fast_gpu_ms over the H100
datasheet bandwidth (validate/latency.DATASHEET, by GPU name); the copy rate measured in the same run is reported beside it.

--triton-gemv on|off|both: the dense decode projections on the Triton GEMV (kernels/gemv.py) or cuBLAS; `both`
measures each case both ways in the same run (column triton_gemv), and runs the fp32 check both ways.
--l2-prefetch SPEC...: each case once per list of L2 prefetch sites (runtime/torch_fast.py L2_PREFETCH_SITES), e.g.
`none xproj all`, in the same run (column l2_prefetch).

Run: python benchmarks/bench_decode.py [--presets blackmamba-2.8b] [--batches 1 8 64] [--triton-gemv both]
"""

from __future__ import annotations

import argparse

import torch
from _bench import device_facts, gpu_ms, host_us_per_call, measured_ceilings, spec, table, wall_ms, write_json

from mambadeploy import settings
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


def follow(fast, eager, prompt, steps=16):
    """torch-fast follows the eager runner's greedy tokens: (top-1 agreement, max logit error / scale)."""
    lf, sf = fast.prefill(prompt)
    le, se = eager.prefill(prompt)
    agree, total, worst = 0, 0, rel_to_scale(lf, le)[0]
    for _ in range(steps):
        agree += int((lf.argmax(-1) == le.argmax(-1)).sum())
        total += prompt.shape[0]
        token = le.argmax(-1)
        lf, sf = fast.step(token, sf)
        le, se = eager.step(token, se)
        worst = max(worst, rel_to_scale(lf, le)[0])
    return agree / total, worst, sf, se, token


def fp32_check(preset, gemv_flags=(True,)) -> list[dict]:
    model = build_preset(preset, dtype=torch.float32, device="cuda")
    rows = []
    for flag in gemv_flags:
        g = torch.Generator(device="cuda").manual_seed(7)
        prompt = torch.randint(0, model.config.vocab_size, (2, 16), generator=g, device="cuda")
        with torch.no_grad():
            fast = TorchFastRunner(model, check_inputs=False, triton_gemv=flag)
            top1, err, *_ = follow(fast, TorchEagerRunner(model), prompt)
        rows.append({"preset": preset, "triton_gemv": flag, "fp32_top1_agreement": top1, "fp32_max_rel_err": err})
        print(rows[-1], flush=True)
    return rows


def profile_step(fast, token, state, top=14) -> list[dict]:
    """GPU time per kernel name over one ungraphed torch-fast step (torch profiler): where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    eager_fast = TorchFastRunner(fast.model, use_cuda_graph=False, check_inputs=False, triton_gemv=fast.triton_gemv,
                                 l2_prefetch=",".join(fast.l2_prefetch) or "none")
    scratch = state.clone()
    eager_fast.step(token, scratch)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        eager_fast.step(token, scratch)
        torch.cuda.synchronize()
    rows = [{"kernel": e.key[:80], "calls": e.count, "gpu_us": e.self_device_time_total}
            for e in prof.key_averages() if e.self_device_time_total > 0]
    rows.sort(key=lambda r: -r["gpu_us"])
    total = sum(r["gpu_us"] for r in rows)
    print(f"profile: {total:.0f} us of kernels in one ungraphed step, {sum(r['calls'] for r in rows)} launches")
    print(table(rows[:top], ["kernel", "calls", "gpu_us"]))
    return rows[:top] + [{"kernel": "TOTAL", "calls": sum(r["calls"] for r in rows), "gpu_us": total}]


def bench_case(model, preset, batch, ceil, eager_reps, profile=False, triton_gemv=True, l2_prefetch="all"):
    V = model.config.vocab_size
    g = torch.Generator(device="cuda").manual_seed(batch)
    prompt = torch.randint(0, V, (batch, 16), generator=g, device="cuda")
    fast = TorchFastRunner(model, check_inputs=False, triton_gemv=triton_gemv, l2_prefetch=l2_prefetch)
    eager = TorchEagerRunner(model)
    top1, err, sf, se, token = follow(fast, eager, prompt)
    row = {"preset": preset, "batch": batch, "triton_gemv": triton_gemv, "l2_prefetch": fast.describe()["l2_prefetch"],
           "pdl": settings.current().pdl, "bf16_top1_agreement": top1,
           "bf16_max_rel_err": err}

    # bytes actually read: routing of one real step, recorded by an eager (ungraphed) fast runner on a copy
    tracer = TorchFastRunner(model, use_cuda_graph=False, check_inputs=False, triton_gemv=triton_gemv)
    tracer.routing_trace = []
    tracer.step(token, sf.clone())
    weights, parts = weight_bytes_read(model, tracer.routing_trace)
    total_bytes = weights + state_bytes(sf)
    row.update({"bytes_per_token": total_bytes, "bytes_parts": parts, "state_bytes": state_bytes(sf)})

    # timings
    token = torch.randint(0, V, (batch,), generator=g, device="cuda")
    for _ in range(3):
        fast.step(token, sf)
    row["fast_gpu_ms"] = gpu_ms(sf.graph.replay, reps=50, warmup=0)
    row["fast_host_us"] = host_us_per_call(lambda: fast.step(token, sf), calls=20)
    row["fast_wall_ms"] = wall_ms(lambda: fast.step(token, sf), 20)
    row["eager_ms"] = wall_ms(lambda: eager.step(token, se), eager_reps)
    row["speedup_vs_eager"] = row["eager_ms"] / row["fast_wall_ms"]
    row["roofline_pct_spec"] = 100 * total_bytes / (row["fast_gpu_ms"] * 1e-3) / spec(ceil, "hbm_spec_bytes_per_s")
    row["roofline_pct_copy"] = 100 * total_bytes / (row["fast_gpu_ms"] * 1e-3) / ceil["copy_bytes_per_s"]
    row["floor_ms_spec"] = total_bytes / spec(ceil, "hbm_spec_bytes_per_s") * 1e3
    if profile:
        row["profile"] = profile_step(fast, token, sf)
    print({k: v for k, v in row.items() if k != "profile"}, flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["blackmamba-1.5b", "blackmamba-2.8b"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--eager-reps", type=int, default=5)
    parser.add_argument("--name", default="decode")
    parser.add_argument("--profile", action="store_true", help="per-kernel GPU time of one step (torch profiler)")
    parser.add_argument("--no-fp32-check", action="store_true")
    parser.add_argument("--triton-gemv", choices=["on", "off", "both"], default="on",
                        help="dense decode projections on the Triton GEMV (on), cuBLAS (off), or each case both ways")
    parser.add_argument("--l2-prefetch", nargs="+", default=["all"],
                        help="L2 prefetch site lists to measure each case with (e.g. none xproj xproj,fc1 all)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each batch-1 variant list this many times, alternating (an A/B in one process)")
    args = parser.parse_args()
    flags = {"on": (True,), "off": (False,), "both": (False, True)}[args.triton_gemv]
    facts, ceil = device_facts(), measured_ceilings()
    print(facts, ceil, flush=True)
    rows, checks = [], []
    for preset in args.presets:
        if not args.no_fp32_check:
            checks.extend(fp32_check(preset, flags))
            torch.cuda.empty_cache()
        model = build_preset(preset, dtype=torch.bfloat16, device="cuda")
        with torch.no_grad():
            for batch in args.batches:
                for flag in flags:
                    for spec in args.l2_prefetch:
                        for _ in range(args.repeat if batch == 1 else 1):
                            rows.append(bench_case(model, preset, batch, ceil, args.eager_reps, args.profile,
                                                   flag, spec))
                            torch.cuda.empty_cache()
        del model
        torch.cuda.empty_cache()
    write_json(args.name, {"device": facts, "ceilings": ceil, "dtype": "bf16", "fp32_checks": checks, "rows": rows})
    print(table(rows, ["preset", "batch", "triton_gemv", "pdl", "l2_prefetch", "fast_gpu_ms", "fast_wall_ms", "fast_host_us", "eager_ms", "speedup_vs_eager",
                       "bytes_per_token", "floor_ms_spec", "roofline_pct_spec", "roofline_pct_copy",
                       "bf16_top1_agreement", "bf16_max_rel_err"]))
    if checks:
        print(table(checks, ["preset", "triton_gemv", "fp32_top1_agreement", "fp32_max_rel_err"]))


if __name__ == "__main__":
    main()
