"""ONNX Runtime (CUDA EP) next to torch eager, in one run on one GPU:

1. low-precision agreement: ORT-CUDA fp16 (and bf16 where ORT runs it) against the fp32 torch reference on the tiny
   presets, teacher-forced top-1 over a prompt's last position and every decode step (the reference's greedy tokens are
   fed to both), plus ORT-CUDA fp32 against the reference (use_tf32=0) as a parity check;
2. the blackmamba-1.5b shape (random weights, built on the GPU, exported on the machine's CPU): prefill ms at 512 and
   2048 tokens (batch 1) and decode ms per step at batch 1 and 16, for torch eager, ORT-CUDA, and ORT-CUDA with the
   decode step captured in a CUDA graph (kept only if it computes the same logits).

Each part is checked before it is timed and fails on its own (the error is recorded, the rest still runs); the JSON is
rewritten after every part, so a run cut short still leaves what it measured.

  python benchmarks/bench_ort.py --out results.json                     # on the GPU machine
  python benchmarks/bench_ort.py --out /tmp/x.json --provider cpu --smoke   # a quick dry run anywhere
Tiny exports are taken from --exports DIR when there (made elsewhere and carried), else made here.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch

from mambadeploy.export.exporter import export_model
from mambadeploy.models.checkpoint import build_preset, load_model
from mambadeploy.models.presets import TINY_PRESETS
from mambadeploy.runtime.ort_runner import OrtRunner
from mambadeploy.runtime.torch_eager import TorchEagerRunner
from mambadeploy.validate.tolerances import LOGITS_REL, TOP1_AGREEMENT, rel_to_scale

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Results:
    def __init__(self, path: Path, meta: dict):
        self.path, self.data = path, {**meta, "errors": {}}
        self.save()

    def put(self, key, value):
        self.data[key] = value
        self.save()

    def error(self, part: str, exc: BaseException):
        self.data["errors"][part] = f"{type(exc).__name__}: {exc}"[:2000]
        traceback.print_exc()
        self.save()

    def save(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2))


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- 1. agreement on the tiny presets
def tiny_export(name: str, dtype: str, exports: Path) -> Path:
    d = exports / f"{name}-{dtype}"
    if not (d / "manifest.json").is_file():
        export_model(load_model(name, dtype=dtype), d, force=True)
    return d


@torch.no_grad()
def agreement(name: str, dtype: str, provider: str, device: str, exports: Path, prompt_len=16, steps=127,
              batch=8):
    """Teacher-forced top-1 agreement and max logit error (relative to scale) of ORT in `dtype` vs fp32 torch."""
    ref = load_model(name, dtype="fp32", device=device)
    runners = {"ort": OrtRunner.from_dir(tiny_export(name, dtype, exports), provider)}
    if dtype != "fp32":  # the torch model in the same dtype on the same path: what this dtype itself costs
        runners["torch_same_dtype"] = TorchEagerRunner(load_model(name, dtype=dtype, device=device))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ref.config.vocab_size, (batch, prompt_len), generator=g)
    lengths = torch.tensor([prompt_len - (3 * i) % prompt_len for i in range(batch)])
    want, ref_state = ref.prefill(ids.to(device), lengths.to(device))
    outs = {k: r.prefill(ids, lengths) for k, r in runners.items()}
    stats = {k: {"agree": 0, "worst": 0.0} for k in runners}
    total = 0
    for step in range(steps + 1):
        want = want.float().cpu()
        total += batch
        for k, (got, _) in outs.items():
            got = got.float().cpu()
            stats[k]["agree"] += int((got.argmax(-1) == want.argmax(-1)).sum())
            stats[k]["worst"] = max(stats[k]["worst"], rel_to_scale(got, want)[0])
        if step == steps:
            break
        tok = want.argmax(-1)  # teacher forcing: every runner follows the reference
        outs = {k: runners[k].step(tok, st) for k, (_, st) in outs.items()}
        want, ref_state = ref.step(tok.to(device), ref_state)
    out = {"positions": total, "bound_top1": TOP1_AGREEMENT[DTYPES[dtype]], "bound_logits": LOGITS_REL[DTYPES[dtype]]}
    for k, st in stats.items():
        out[k] = {"top1_agreement": st["agree"] / total, "max_err_rel_to_scale": st["worst"]}
    # the criterion is top-1 agreement; the logit error is reported beside the same-dtype torch model's (a routing
    # flip at a near-tie moves the logits of both by a lot, at a few positions)
    out["ok"] = out["ort"]["top1_agreement"] >= out["bound_top1"]
    return out


# --------------------------------------------------------------------------- 2. timings on a full-size shape
def median_ms(fn, reps, device, warmup=1):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def time_runner(runner, vocab, device, prefill_lengths, decode_batches, steps, prefill_reps, budget_s=90.0):
    """Prefill ms (batch 1) per length; decode ms per step (host clock around each step: what generate sees) per batch.
    A prefill slower than budget_s / (reps + 1) is run once only."""
    g = torch.Generator().manual_seed(1)
    out = {"prefill_ms": {}, "decode_ms_per_step": {}}
    for L in prefill_lengths:
        ids = torch.randint(0, vocab, (1, L), generator=g)
        t = time.perf_counter()
        runner.prefill(ids)
        sync(device)
        first = time.perf_counter() - t
        reps = prefill_reps if first * (prefill_reps + 1) < budget_s else 0
        out["prefill_ms"][str(L)] = median_ms(lambda ids=ids: runner.prefill(ids), reps, device, warmup=0) if reps \
            else first * 1e3
    for B in decode_batches:
        ids = torch.randint(0, vocab, (B, 16), generator=g)
        logits, state = runner.prefill(ids)
        tok = logits.argmax(-1)
        for _ in range(3):  # warm-up (and, in CUDA-graph mode, the capture)
            logits, state = runner.step(tok, state)
        sync(device)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            logits, state = runner.step(tok, state)
            tok = logits.argmax(-1)
            sync(device)
            times.append((time.perf_counter() - t) * 1e3)
        out["decode_ms_per_step"][str(B)] = statistics.median(times)
    return out


@torch.no_grad()
def same_decode(a, b, vocab, batch=2, steps=8):
    """Max logit error (relative to scale) between two runners over a prefill and `steps` decode steps."""
    ids = torch.randint(0, vocab, (batch, 12), generator=torch.Generator().manual_seed(2))
    la, sa = a.prefill(ids)
    lb, sb = b.prefill(ids)
    worst = rel_to_scale(la.float().cpu(), lb.float().cpu())[0]
    for _ in range(steps):
        tok = lb.argmax(-1)
        la, sa = a.step(tok, sa)
        lb, sb = b.step(tok, sb)
        worst = max(worst, rel_to_scale(la.float().cpu(), lb.float().cpu())[0])
    return worst


def full_size(res: Results, args, device):
    preset, dtype = args.preset, DTYPES[args.dtype]
    t0 = time.perf_counter()
    cpu_model = build_preset(preset, dtype=dtype, device="cpu")  # weights are drawn on the CPU on every device
    build_s = time.perf_counter() - t0
    export_dir = Path(args.work) / f"{preset}-{args.dtype}"
    t0 = time.perf_counter()
    export_model(cpu_model, export_dir, force=True, progress=print)
    export_s = time.perf_counter() - t0
    model = cpu_model.to(device)  # moves the parameters: the CPU copy goes
    model.source = cpu_model.source
    del cpu_model
    gc.collect()
    part = {"preset": preset, "dtype": args.dtype, "build_s": build_s, "export_s": export_s,
            "export_files": {p.name: p.stat().st_size for p in export_dir.iterdir()},
            "prefill_lengths": args.lengths, "decode_batches": args.batches, "decode_steps": args.steps}
    res.put("full_size", part)
    vocab = model.config.vocab_size
    runs = {}

    def measure(label, make):
        try:
            t = time.perf_counter()
            runner = make()
            load_s = time.perf_counter() - t
            print(f"--- {label}: loaded in {load_s:.1f} s", flush=True)
            runs[label] = {"load_s": load_s, "describe": runner.describe(),
                           **time_runner(runner, vocab, device, args.lengths, args.batches, args.steps, args.reps)}
            print(label, json.dumps({k: v for k, v in runs[label].items() if k != "describe"}), flush=True)
            return runner
        except Exception as exc:  # noqa: BLE001 - one backend failing must not lose the others' numbers
            runs[label] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            traceback.print_exc()
            return None
        finally:
            part["runs"] = runs
            res.put("full_size", part)

    torch_runner = measure("torch-eager", lambda: TorchEagerRunner(model))
    ort_runner = measure("ort-" + args.provider, lambda: OrtRunner.from_dir(export_dir, args.provider))
    if ort_runner is not None and torch_runner is not None:
        part["ort_vs_torch_max_err_rel_to_scale"] = same_decode(ort_runner, torch_runner, vocab)
    if args.provider == "cuda" and ort_runner is not None:
        graph_runner = measure("ort-cuda-graph", lambda: OrtRunner.from_dir(export_dir, "cuda", cuda_graph=True))
        if graph_runner is not None:
            err = same_decode(graph_runner, ort_runner, vocab)
            part["cuda_graph_vs_plain_max_err_rel_to_scale"] = err
            plain = runs["ort-cuda"]["decode_ms_per_step"]
            graph = runs["ort-cuda-graph"]["decode_ms_per_step"]
            part["cuda_graph_kept"] = err <= LOGITS_REL[torch.float32] and all(graph[b] < plain[b] for b in plain)
    res.put("full_size", part)


# --------------------------------------------------------------------------- main
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--provider", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--exports", default=str(ROOT / ".bench-exports"), help="tiny exports (made here when missing)")
    p.add_argument("--work", default="/tmp/bench-ort", help="where the full-size export is written")
    p.add_argument("--preset", default="blackmamba-1.5b")
    p.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    p.add_argument("--agree-dtypes", nargs="+", default=["fp16", "bf16"])
    p.add_argument("--lengths", nargs="+", type=int, default=[512, 2048])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--parts", nargs="+", default=["agreement", "full"])
    p.add_argument("--smoke", action="store_true", help="small shapes (a dry run of the script)")
    args = p.parse_args()
    if args.smoke:
        args.preset, args.lengths, args.batches, args.steps, args.reps = "blackmamba-tiny", [64], [1, 2], 4, 1
    device = "cuda" if args.provider == "cuda" else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference stays fp32
        torch.backends.cudnn.allow_tf32 = False
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    res = Results(Path(args.out), {
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None, "provider": args.provider,
        "onnxruntime": ort.__version__, "ort_providers": ort.get_available_providers(), "torch": torch.__version__,
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "method": "host clock around each call with device synchronisation; prefill batch 1 (median of --reps after a "
                  "warm-up); decode: median step over --steps after 3 warm-up steps, logits back on the host each "
                  "step for ORT (what generate sees), on the device for torch"})
    if "agreement" in args.parts:
        table = {}
        for dtype in ["fp32", *args.agree_dtypes]:
            for name in TINY_PRESETS if dtype != "fp32" else TINY_PRESETS[:1]:
                try:
                    table.setdefault(name, {})[dtype] = agreement(name, dtype, args.provider, device, Path(args.exports))
                    print(name, dtype, table[name][dtype], flush=True)
                except Exception as exc:  # noqa: BLE001 - e.g. a dtype this ORT build has no kernels for
                    table.setdefault(name, {})[dtype] = {"error": f"{type(exc).__name__}: {exc}"[:1500]}
                    print(name, dtype, "ERROR", exc, flush=True)
                res.put("agreement", table)
    if "full" in args.parts:
        try:
            full_size(res, args, device)
        except Exception as exc:  # noqa: BLE001
            res.error("full_size", exc)
    print(json.dumps(res.data, indent=1)[-6000:])


if __name__ == "__main__":
    main()
