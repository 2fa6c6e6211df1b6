"""Where the persistent batch-1 decode step's time goes (kernels/decode_persistent.py), on the GPU: program 0 stamps
the GPU's global timer at every grid barrier's entry and exit (TRACE), so each phase's work (from passing its barrier
to arriving at the next) and each barrier's wait (the slowest program's lag plus the barrier's own latency) are
measured inside the real kernel. Medians over uncaptured launches on one state, per phase kind, summed over the step.

Run: python benchmarks/trace_persistent.py [--presets blackmamba-2.8b] [--reps 20]
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
from _bench import device_facts, gpu_ms, table, write_json

from mambadeploy.models.checkpoint import build_preset
from mambadeploy.runtime.torch_fast import TorchFastRunner


def trace_preset(preset, reps) -> dict:
    model = build_preset(preset, dtype=torch.bfloat16, device="cuda")
    runner = TorchFastRunner(model, check_inputs=False, persistent=True)
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), device="cuda")
    with torch.no_grad():
        logits, state = runner.prefill(prompt)
        token = logits.argmax(-1)
        for _ in range(3):
            logits, state = runner.step(token, state)
        traced = runner._persistent_for(state, trace=True)
        runs = []
        for _ in range(reps):
            traced(state.tokens)
            torch.cuda.synchronize()
            runs.append(traced.timeline())
        traced.check()
        step_ms = gpu_ms(state.graph.replay, reps=50, warmup=5)
        kernel_ms = gpu_ms(lambda: traced(state.tokens), reps=50, warmup=5)
    rows = []
    for name in dict.fromkeys(traced.phases):
        idx = [i for i, p in enumerate(traced.phases) if p == name]
        work = [statistics.median(run[i]["work_us"] for run in runs) for i in idx]
        wait = [statistics.median(run[i]["wait_us"] for run in runs) for i in idx]
        row = {"preset": preset, "phase": name, "count": len(idx), "work_us": statistics.median(work),
               "wait_us": statistics.median(wait), "total_us": sum(work) + sum(wait)}
        for part in ("prologue_us", "loop_us"):
            if part in runs[0][idx[0]]:
                row[part] = statistics.median(run[i][part] for run in runs for i in idx)
        rows.append(row)
    span = [sum(r["work_us"] + r["wait_us"] for r in run) for run in runs]
    print(table(rows, ["preset", "phase", "count", "work_us", "prologue_us", "loop_us", "wait_us", "total_us"]))
    compiled = traced.compiled
    regs = {"n_regs": getattr(compiled, "n_regs", None), "n_spills": getattr(compiled, "n_spills", None),
            "tiles": os.environ.get("MAMBADEPLOY_PERSISTENT_TILES", ""),
            "prefetch": traced.config["constexprs"]["PREFETCH"]}
    print(regs)
    print(f"{preset}: program 0's span {statistics.median(span):.1f} us; persistent launch {kernel_ms * 1e3:.1f} us "
          f"(traced, uncaptured); captured step {step_ms:.4f} ms")
    return {"preset": preset, "rows": rows, **regs, "span_us": statistics.median(span), "kernel_ms_traced": kernel_ms,
            "step_ms": step_ms, "runs": runs[:3]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["blackmamba-2.8b"])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--name", default="trace_persistent")
    args = parser.parse_args()
    facts = device_facts()
    print(facts, flush=True)
    results = [trace_preset(p, args.reps) for p in args.presets]
    write_json(args.name, {"device": facts, "dtype": "bf16", "presets": results})


if __name__ == "__main__":
    main()
