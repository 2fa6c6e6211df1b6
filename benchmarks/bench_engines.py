"""The deployment engines against our own runtime, in one run on one GPU (issue "Deployment-grade engines").

For each model shape (random weights, seeded, drawn on the CPU so every runner gets the same ones) it times four
runners on the same weights — ORT-CUDA on the `--ops custom` export in fp16 and in bf16 (our CUDA custom-op library,
decode in ORT's CUDA graph with torch-owned ping-pong buffers), torch-fast bf16 (Triton + CUDA graphs, graphed prefill),
torch eager bf16 — at decode batch 1 / 8 / 64 and prefill of 512 / 2048 tokens (batch 1). Each ORT runner's logits are
first compared with torch eager in its own dtype over a prefill and 8 teacher-forced steps (max error / logit scale).
A parity part checks ORT-CUDA custom fp32 against the fp32 torch reference on the tiny presets (64 decode steps,
teacher-forced, bound 1e-4 of the logit scale). A profile part records a per-kernel GPU timeline of ORT decode steps.

Timing: host clock around each call with device synchronisation — what generate sees. Decode: median of --steps
steps after 3 warm-up steps (the CUDA-graph capture); prefill: median of 3 after one warm-up.
The exports are written by `--export-only` (CPU work; run it in the background while the GPU is busy).

    python benchmarks/bench_engines.py --export-only --work /tmp/engines
    python benchmarks/bench_engines.py --work /tmp/engines --out results.json [--models ...] [--parts ...]
    python benchmarks/bench_engines.py --smoke --work /tmp/e --out /tmp/e.json      # tiny shapes, CPU allowed
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import bench_ort_custom
from bench_ort import Results
from bench_ort import same_decode as max_error
from bench_ort_custom import build

from mambadeploy.models.presets import TINY_PRESETS

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODELS = ("blackmamba-1.5b", "blackmamba-2.8b", "jamba-1.5-mini:8")


def export_dir(work: Path, spec: str, dtype: str) -> Path:
    return bench_ort_custom.export_dir(work, spec, dtype, "custom")


def export_all(work: Path, models, dtypes) -> None:
    from mambadeploy.export.exporter import export_model

    for spec in models:
        for dtype in dtypes:
            out = export_dir(work, spec, dtype)
            if (out / "manifest.json").is_file():
                continue
            t = time.perf_counter()
            export_model(build(spec, DTYPES[dtype]), out, ops="custom", force=True, progress=print)
            print(f"exported {out.name} in {time.perf_counter() - t:.0f} s", flush=True)
            gc.collect()
    (work / "DONE").write_text("ok")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_ms(fn, reps):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def time_runner(runner, vocab, lengths, batches, steps, reps):
    g = torch.Generator().manual_seed(1)
    out = {"prefill_ms": {}, "decode_ms": {}}
    for L in lengths:
        ids = torch.randint(0, vocab, (1, L), generator=g)
        runner.prefill(ids)  # warm-up (and a graphed prefill's capture)
        out["prefill_ms"][str(L)] = median_ms(lambda ids=ids: runner.prefill(ids), reps)
    for B in batches:
        logits, state = runner.prefill(torch.randint(0, vocab, (B, 16), generator=g))
        tok = logits.argmax(-1)
        for _ in range(3):
            logits, state = runner.step(tok, state)
        sync()
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            logits, state = runner.step(tok, state)
            tok = logits.argmax(-1)
            sync()
            times.append((time.perf_counter() - t) * 1e3)
        out["decode_ms"][str(B)] = statistics.median(times)
        del state
    return out


def shape_part(res: Results, args, spec: str):
    from mambadeploy.runtime.ort_runner import OrtRunner
    from mambadeploy.runtime.torch_eager import TorchEagerRunner
    from mambadeploy.runtime.torch_fast import TorchFastRunner

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build(spec, torch.bfloat16).to(device)
    vocab = model.config.vocab_size
    part = res.data.setdefault("shapes", {}).setdefault(spec, {"runs": {}})
    eager = TorchEagerRunner(model)
    provider = "cuda" if device == "cuda" else "cpu"

    def measure(label, make, lengths, batches, steps, reps, check=None):
        try:
            t = time.perf_counter()
            runner = make()
            run = {"load_s": time.perf_counter() - t, "describe": runner.describe()}
            if check is not None:
                run["max_err_vs_torch_same_dtype"] = max_error(runner, check, vocab)
            run.update(time_runner(runner, vocab, lengths, batches, steps, reps))
            if getattr(runner, "aot", None):  # did the ORT ops launch the AOT Triton kernels (and none fall back)?
                run["aot_stats"] = runner.aot_stats()
            part["runs"][label] = run
            print(label, json.dumps({k: v for k, v in run.items() if k != "describe"}), flush=True)
        except Exception as exc:  # noqa: BLE001 - one runner failing must not lose the others' numbers
            part["runs"][label] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            traceback.print_exc()
        finally:
            res.save()
            gc.collect()
            torch.cuda.empty_cache() if device == "cuda" else None

    B, L = args.batches, args.lengths
    measure("torch-fast:bf16", lambda: TorchFastRunner(model, prefill_graphs=True), L, B, args.steps, 3)
    for dtype in args.dtypes:
        directory = export_dir(Path(args.work), spec, dtype)
        check = eager if dtype == "bf16" else TorchEagerRunner(build(spec, DTYPES[dtype]).to(device))
        for kernels in args.ort_kernels:  # "aot": torch-fast's Triton kernels; "cuda": the hand-written ones
            label = f"ort-{provider}-custom:{dtype}" + ("" if kernels == "aot" else "/cuda-kernels")
            measure(label, lambda d=directory, k=kernels: OrtRunner(d, provider, aot_kernels=k == "aot"), L, B,
                    args.steps, 3, check)
        del check
        gc.collect()
    measure("torch-eager:bf16", lambda: eager, L, B[:2], 3, 1)


def parity_part(res: Results, args):
    """ORT-CUDA, custom ops, fp32: every tiny preset against the fp32 torch reference, teacher-forced."""
    from mambadeploy.export.exporter import export_model
    from mambadeploy.runtime.ort_runner import OrtRunner
    from mambadeploy.runtime.torch_eager import TorchEagerRunner
    from mambadeploy.validate.tolerances import LOGITS_REL

    table = {}
    for name in TINY_PRESETS:
        model = build(name, torch.float32)
        out = Path(args.work) / f"{name}-fp32-custom"
        if not (out / "manifest.json").is_file():
            export_model(model, out, ops="custom", force=True)
        err = max_error(OrtRunner(out, "cuda" if torch.cuda.is_available() else "cpu"), TorchEagerRunner(model),
                        model.config.vocab_size, batch=3, steps=64)
        table[name] = {"max_err_rel_to_scale": err, "bound": LOGITS_REL[torch.float32],
                       "passed": err <= LOGITS_REL[torch.float32]}
        print("parity", name, table[name], flush=True)
    res.put("parity_fp32_ort_cuda_custom", table)


def profile_part(res: Results, args, spec: str, dtype: str, what: str, reps: int = 5):
    """Per-kernel GPU time of ORT decode steps (`what` = "b1", "b64") or of one prefill ("L2048"): the torch profiler
    (CUPTI) records ORT's kernels too, also inside its CUDA graph."""
    from torch.profiler import ProfilerActivity, profile

    from mambadeploy.runtime.ort_runner import OrtRunner

    runner = OrtRunner(export_dir(Path(args.work), spec, dtype), "cuda")
    vocab = runner.config.vocab_size
    g = torch.Generator().manual_seed(3)
    if what.startswith("b"):
        logits, state = runner.prefill(torch.randint(0, vocab, (int(what[1:]), 16), generator=g))
        tok = logits.argmax(-1)
        for _ in range(3):
            logits, state = runner.step(tok, state)

        def work():
            nonlocal logits, state
            logits, state = runner.step(tok, state)
    else:
        ids = torch.randint(0, vocab, (1, int(what[1:])), generator=g)
        runner.prefill(ids)

        def work():
            runner.prefill(ids)
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            work()
        sync()
    kernels = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", 0) or getattr(ev, "cuda_time_total", 0)
        if t:
            kernels[ev.key[:120]] = {"us_per_call": t / reps, "launches_per_call": ev.count / reps}
    top = dict(sorted(kernels.items(), key=lambda kv: -kv[1]["us_per_call"])[:30])
    total = sum(k["us_per_call"] for k in kernels.values())
    res.data.setdefault("profiles", {})[f"{spec}:{dtype}:{what}"] = {"gpu_us_per_call": total, "kernels": top}
    res.save()
    print("profile", spec, dtype, what, f"{total:.0f} us on the GPU per call", flush=True)
    for name, k in list(top.items())[:12]:
        print(f"   {k['us_per_call']:8.1f} us {k['launches_per_call']:6.1f}x  {name[:90]}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/engines")
    p.add_argument("--out")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    p.add_argument("--lengths", nargs="+", type=int, default=[512, 2048])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--parts", nargs="+", default=["parity", "shapes", "profile"])
    p.add_argument("--profile", nargs="+", default=["b1", "b64", "L2048"], help="what the profile part records")
    p.add_argument("--ort-kernels", nargs="+", choices=["aot", "cuda"], default=["aot", "cuda"],
                   help="which kernels the ORT custom ops launch: torch-fast's Triton kernels compiled ahead of time "
                        "(aot) and/or the library's hand-written CUDA kernels (cuda), each a run of its own")
    p.add_argument("--export-only", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny shapes: a dry run of the script")
    args = p.parse_args()
    if args.smoke:
        args.models, args.batches, args.lengths, args.steps = ["blackmamba-tiny", "jamba-tiny"], [1, 3], [17], 3
        args.dtypes = args.dtypes if torch.cuda.is_available() else ["fp32"]  # our CPU kernels are fp32
    if args.export_only:
        export_all(Path(args.work), args.models, args.dtypes)
        return
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    from _bench import device_facts, measured_ceilings

    gpu = torch.cuda.is_available()
    meta = {"what": "ORT-CUDA --ops custom vs torch-fast vs torch eager, same weights", "onnxruntime": ort.__version__,
            **(device_facts() if gpu else {"gpu": None}), "ceilings": measured_ceilings() if gpu else None,
            "method": "host clock around each call, device synchronised; decode median of --steps after 3 warm-up "
                      "steps; prefill batch 1, median of 3 after a warm-up", "args": vars(args)}
    res = Results(Path(args.out), meta)
    if "parity" in args.parts:
        try:
            parity_part(res, args)
        except Exception as exc:  # noqa: BLE001
            res.error("parity", exc)
    if "shapes" in args.parts:
        for spec in args.models:
            try:
                shape_part(res, args, spec)
            except Exception as exc:  # noqa: BLE001
                res.error(spec, exc)
    if "profile" in args.parts and gpu:
        for spec in args.models[:1]:
            for what in args.profile:
                try:
                    profile_part(res, args, spec, args.dtypes[0], what)
                except Exception as exc:  # noqa: BLE001
                    res.error(f"profile {spec} {what}", exc)
    print(json.dumps({k: v for k, v in res.data.items() if k != "profiles"}, indent=1)[-5000:])


if __name__ == "__main__":
    main()
