"""ORT-CUDA prefill with our custom ops (`--ops custom`: SelectiveScan / CausalConv1d / TopKExpertGather nodes run by
the CUDA kernels of the mambadeploy ORT library) against the portable graph (`--ops portable`: the same model in
standard ONNX ops, the scan as an ONNX Scan loop), in one run on one GPU.

For each model and dtype: both exports, both loaded in the ORT runner with the CUDA provider (the runner registers our
library for the custom export); first a check — the custom nodes really run on the CUDA provider (ORT's profile names
each node's provider) and both exports' prefill logits agree with the torch model's — then the timing: median
wall-clock ms of OrtRunner.prefill (ids up, last logits down, states kept on the GPU; ORT returns when the GPU is done),
after warm-up, at each prompt length.

Models: blackmamba-tiny, and the blackmamba-1.5b shapes with fewer layers (`blackmamba-1.5b:2` = its first 2 layers,
one Mamba and one MoE layer; d_model 1152, d_inner 2304, 8 experts of width 3072, vocab 50304): the full 30 layers would
not fit the time of one device call, and the ratio per layer pair is what the ops decide.

    python benchmarks/bench_ort_custom.py --export-only DIR           # CPU only: write the exports into DIR
    python benchmarks/bench_ort_custom.py --exports DIR [--out RESULTS_DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mambadeploy.models.checkpoint import empty_model  # noqa: E402
from mambadeploy.models.model import init_random_  # noqa: E402
from mambadeploy.models.presets import preset_config  # noqa: E402

DEFAULT_MODELS = ("blackmamba-tiny", "blackmamba-1.5b:2")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def build(spec: str, dtype: torch.dtype):
    """`preset` or `preset:N` (the preset's first N layers), seeded random weights, eval mode, CPU."""
    name, _, n = spec.partition(":")
    config = preset_config(name)
    if n:
        config = dataclasses.replace(config, layers=config.layers[: int(n)], name=f"{name}-{n}L")
    return init_random_(empty_model(config, dtype), seed=0).eval()


def export_dir(root: Path, spec: str, dtype: str, ops: str) -> Path:
    return root / f"{spec.replace(':', '-')}-{dtype}-{ops}"


def export_all(root: Path, models, dtypes) -> None:
    from mambadeploy.export.exporter import export_model

    root.mkdir(parents=True, exist_ok=True)
    for spec in models:
        for dt in dtypes:
            model = build(spec, DTYPES[dt])
            for ops in ("custom", "portable"):
                out = export_dir(root, spec, dt, ops)
                t = time.perf_counter()
                export_model(model, out, ops=ops, force=True)
                print(f"exported {out.name} in {time.perf_counter() - t:.1f} s", flush=True)
    (root / "DONE").write_text("ok")


def placement(directory: Path) -> dict:
    """{op type: {provider: node count}} for the custom nodes of prefill.onnx, from one profiled CUDA run."""
    import onnxruntime as ort

    from mambadeploy.plugins.ort.build import register

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(directory / "profile")
    so.log_severity_level = 3
    register(so, cuda=True)
    sess = ort.InferenceSession(str(directory / "prefill.onnx"), so,
                                providers=[("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"])
    ids = torch.zeros(1, 8, dtype=torch.int64).numpy()
    sess.run(None, {"input_ids": ids, "lengths": torch.full((1,), 8, dtype=torch.int64).numpy()})
    events = json.loads(Path(sess.end_profiling()).read_text())
    seen: dict = {}
    for ev in events:
        args = ev.get("args", {})
        if ev.get("cat") == "Node" and args.get("op_name") in ("SelectiveScan", "CausalConv1d", "TopKExpertGather") \
                and ev["name"].endswith("_kernel_time"):
            counts = seen.setdefault(args["op_name"], {})
            counts[args.get("provider", "?")] = counts.get(args.get("provider", "?"), 0) + 1
    return seen


def time_prefill(runner, ids, warmup: int, reps: int) -> dict:
    for _ in range(warmup):
        runner.prefill(ids)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        runner.prefill(ids)
        times.append((time.perf_counter() - t) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "reps": reps}


def run(exports: Path, models, dtypes, lengths, batch: int, reps: int, budget_s: float, out_path: Path) -> dict:
    """Measure every model x dtype; the results JSON is rewritten after each length (a later failure loses nothing)."""
    import onnxruntime as ort

    torch.backends.cudnn.allow_tf32 = False  # the torch reference in fp32 really fp32 (its conv goes to cuDNN)
    torch.backends.cuda.matmul.allow_tf32 = False
    start = time.perf_counter()
    results = {"what": __doc__.split("\n\n")[0], "gpu": torch.cuda.get_device_name(), "onnxruntime": ort.__version__,
               "torch": torch.__version__, "batch": batch, "models": [],
               "method": "median wall-clock ms of OrtRunner.prefill after 2 warm-ups; ids up, last logits down, "
                         "states stay on the GPU; logits error = max abs error / logit scale against the torch model "
                         "on the GPU"}

    def save():
        out_path.write_text(json.dumps(results, indent=1))

    for spec in models:
        for dt in dtypes:
            entry = {"model": spec, "dtype": dt, "lengths": {}}
            results["models"].append(entry)
            try:
                measure(entry, exports, spec, dt, lengths, batch, reps, start, budget_s, save)
            except Exception as exc:  # one model's failure is recorded and the others still run
                entry["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                print(f"{spec} {dt}: FAILED {entry['error']}", flush=True)
            save()
            torch.cuda.empty_cache()
    return results


def measure(entry, exports, spec, dt, lengths, batch, reps, start, budget_s, save) -> None:
    from mambadeploy.runtime.ort_runner import OrtRunner
    from mambadeploy.validate.tolerances import LOGITS_REL, rel_to_scale

    model = build(spec, DTYPES[dt]).to("cuda")
    entry["layers"] = [f"{s.mixer}/{s.ffn}" for s in model.config.layers]
    entry["placement"] = placement(export_dir(exports, spec, dt, "custom"))
    runners = {ops: OrtRunner(export_dir(exports, spec, dt, ops), "cuda", check_hashes=False)
               for ops in ("custom", "portable")}
    for L in lengths:
        if time.perf_counter() - start > budget_s:
            entry["lengths"][str(L)] = {"skipped": f"time budget of {budget_s:.0f} s spent"}
            continue
        g = torch.Generator().manual_seed(L)
        ids = torch.randint(0, model.config.vocab_size, (batch, L), generator=g)
        with torch.no_grad():
            ref, _ = model.prefill(ids.cuda())
        row = {}
        for ops, runner in runners.items():
            logits, _ = runner.prefill(ids)
            rel, mean = rel_to_scale(logits, ref.float().cpu())
            row[ops] = {"logits_rel_err_vs_torch": rel, "logits_mean_abs_err": mean,
                        "within_bound": rel <= LOGITS_REL[DTYPES[dt]],
                        **time_prefill(runner, ids, warmup=2, reps=reps)}
        row["speedup_custom_over_portable"] = row["portable"]["median_ms"] / row["custom"]["median_ms"]
        entry["lengths"][str(L)] = row
        c, q = row["custom"], row["portable"]
        print(f"{spec} {dt} L={L}: custom {c['median_ms']:.2f} ms (err {c['logits_rel_err_vs_torch']:.1e}), "
              f"portable {q['median_ms']:.2f} ms (err {q['logits_rel_err_vs_torch']:.1e}), "
              f"x{row['speedup_custom_over_portable']:.1f}", flush=True)
        save()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--export-only", type=Path, help="write the exports into this directory and stop (CPU only)")
    p.add_argument("--exports", type=Path, help="directory of exports made by --export-only")
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    p.add_argument("--dtypes", nargs="+", default=["fp32"], choices=list(DTYPES))
    p.add_argument("--lengths", nargs="+", type=int, default=[512, 2048])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--budget", type=float, default=240.0, help="seconds; lengths past it are skipped (and say so)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "benchmarks" / "results")))
    args = p.parse_args()
    if args.export_only:
        export_all(args.export_only, args.models, args.dtypes)
        return 0
    if not torch.cuda.is_available():
        print("needs a CUDA GPU and onnxruntime-gpu", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name().replace(" ", "_").lower()
    path = args.out / f"ort_custom_vs_portable_{name}.json"
    results = run(args.exports, args.models, args.dtypes, args.lengths, args.batch, args.reps, args.budget, path)
    print(f"wrote {path}")
    return 0 if all("error" not in m for m in results["models"]) else 1


if __name__ == "__main__":
    sys.exit(main())
