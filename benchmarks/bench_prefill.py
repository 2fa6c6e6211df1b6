"""Prefill benchmark on the GPU: ms to run a prompt of 512 / 2048 / 8192 tokens (batch 1) through torch-fast vs the
torch-eager reference, BlackMamba-1.5B and -2.8B shapes (seeded random weights), bf16.

Per case: a check first (last-position logits of both runners, max error relative to the logit scale, and equal top-1),
then fast_ms = wall time of runner.prefill() with a synchronize (median of 5; it includes the host's kernel launches,
~10 a layer, which an eager prefill cannot hide), fast_gpu_kernel_ms = the sum of the GPU kernel times of one prefill
(torch profiler), fast_graphed_ms = the same prefill replayed from a CUDA graph captured once for the prompt shape
(TorchFastRunner(prefill_graphs=True); its logits are checked against the eager prefill's), and eager_ms = the
reference's prefill (median of 3; one run at 8192 tokens, whose Python scan loop is slow). Speed-up and roofline use
the faster of fast_ms and fast_graphed_ms.
Roofline: matmul FLOPs actually done (2 x active weights x tokens; the LM head on the last position only) over that
time, as a share of the GPU's datasheet bf16 rate (validate/latency.DATASHEET) and of the matmul rate measured in the same run.

Run: python benchmarks/bench_prefill.py [--presets ...] [--lengths 512 2048 8192]
"""

from __future__ import annotations

import argparse

import torch
from _bench import device_facts, measured_ceilings, spec, table, wall_ms, write_json

from mambadeploy.models.checkpoint import build_preset
from mambadeploy.runtime.torch_eager import TorchEagerRunner
from mambadeploy.runtime.torch_fast import TorchFastRunner
from mambadeploy.validate.tolerances import rel_to_scale


def matmul_flops(model, tokens: int) -> float:
    """2 x (dense Linear weights + top_k experts) x tokens, + the head on one position."""
    active = 0
    for block in model.layers:
        if block.kind.mixer == "mamba":
            m = block.mixer
            active += sum(lin.weight.numel() for lin in (m.in_proj, m.x_proj, m.dt_proj, m.out_proj))
        if block.kind.ffn == "moe":
            moe = block.ffn
            active += moe.router.weight.numel() + moe.top_k * (moe.w1[0].numel() + moe.w2[0].numel())
    return 2.0 * active * tokens + 2.0 * model.embedding.weight.numel()


def kernel_ms(fn, breakdown: list | None = None, top: int = 16) -> float:
    """Sum of the GPU kernel times of one fn() (torch profiler); with `breakdown`, the top kernels by time are
    appended to it as {"kernel", "calls", "gpu_us"}."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    if breakdown is not None:
        events.sort(key=lambda e: -e.self_device_time_total)
        breakdown.extend({"kernel": e.key[:80], "calls": e.count, "gpu_us": e.self_device_time_total}
                         for e in events[:top])
    return sum(e.self_device_time_total for e in events) / 1e3


def bench_preset(preset, lengths, eager_max_length, ceil, profile=False) -> list[dict]:
    model = build_preset(preset, dtype=torch.bfloat16, device="cuda")
    fast, eager = TorchFastRunner(model), TorchEagerRunner(model)
    graphed = TorchFastRunner(model, prefill_graphs=True)
    rows = []
    for L in lengths:
        g = torch.Generator(device="cuda").manual_seed(L)
        ids = torch.randint(0, model.config.vocab_size, (1, L), generator=g, device="cuda")
        row = {"preset": preset, "batch": 1, "tokens": L}
        lf, _ = fast.prefill(ids)
        if L <= eager_max_length:
            le, _ = eager.prefill(ids)
            row["check_max_rel_err"] = rel_to_scale(lf, le)[0]
            row["check_top1_equal"] = bool(torch.equal(lf.argmax(-1), le.argmax(-1)))
            row["eager_ms"] = wall_ms(lambda: eager.prefill(ids), 3 if L <= 2048 else 1)
        torch.cuda.empty_cache()
        row["fast_ms"] = wall_ms(lambda: fast.prefill(ids), 5)
        breakdown = [] if profile else None
        row["fast_gpu_kernel_ms"] = kernel_ms(lambda: fast.prefill(ids), breakdown)
        if profile:
            row["profile"] = breakdown
            print(table(breakdown, ["kernel", "calls", "gpu_us"]), flush=True)
        try:  # the same prefill replayed from a CUDA graph captured for this prompt shape (no host launch cost)
            lg, _ = graphed.prefill(ids)
            row["graphed_check_max_rel_err"] = rel_to_scale(lg, lf)[0]
            row["fast_graphed_ms"] = wall_ms(lambda: graphed.prefill(ids), 5)
        except Exception as exc:  # recorded, not fatal: the eager numbers stand on their own
            row["graphed_error"] = str(exc).splitlines()[0][:200]
        best = min(row["fast_ms"], row.get("fast_graphed_ms", float("inf")))
        if "eager_ms" in row:
            row["speedup_vs_eager"] = row["eager_ms"] / best
        flops = matmul_flops(model, L)
        row["matmul_tflop"] = flops / 1e12
        row["roofline_pct_spec"] = 100 * flops / (best * 1e-3) / spec(ceil, "bf16_spec_flops")
        row["roofline_pct_measured"] = 100 * flops / (best * 1e-3) / ceil["bf16_matmul_flops"]
        rows.append(row)
        print(row, flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["blackmamba-1.5b", "blackmamba-2.8b"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--eager-max-length", type=int, default=8192, help="skip the eager baseline above this")
    parser.add_argument("--profile", action="store_true", help="per-kernel GPU time of one prefill (torch profiler)")
    parser.add_argument("--name", default="prefill")
    args = parser.parse_args()
    facts, ceil = device_facts(), measured_ceilings()
    print(facts, ceil, flush=True)
    rows = []
    for preset in args.presets:
        rows += bench_preset(preset, args.lengths, args.eager_max_length, ceil, args.profile)
        torch.cuda.empty_cache()
    write_json(args.name, {"device": facts, "ceilings": ceil, "dtype": "bf16", "rows": rows})
    print(table(rows, ["preset", "tokens", "fast_ms", "fast_graphed_ms", "fast_gpu_kernel_ms", "eager_ms",
                       "speedup_vs_eager",
                       "matmul_tflop", "roofline_pct_spec", "roofline_pct_measured", "check_max_rel_err",
                       "check_top1_equal"]))


if __name__ == "__main__":
    main()
