"""`--ops standard` (opset 27's LinearAttention / CausalConvWithState for the Mamba layers) at full layer widths, on
the CPU with onnxruntime >= 1.32: max logit error against the fp32 torch reference over a prefill and teacher-forced
decode steps, and the ORT-CPU decode step time beside `--ops custom` (our CPU kernels) and `--ops portable`, all on
the same weights in one run. Models are presets cut to their first N layers (`preset:N`) so the full widths fit a
small machine. Writes JSON (machine, versions, errors, times).

    python benchmarks/check_standard_ops.py --out benchmarks/results/standard_ops_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engines import build

from mambadeploy.export.exporter import export_model
from mambadeploy.runtime.ort_runner import OrtRunner
from mambadeploy.validate.tolerances import LOGITS_REL, rel_to_scale


@torch.no_grad()
def check(spec: str, modes, prompt: int, steps: int, work: Path) -> dict:
    model = build(spec, torch.float32)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, prompt), generator=torch.Generator().manual_seed(0))
    want, ref_state = model.prefill(ids)
    ref = [want]
    for _ in range(steps):
        want, ref_state = model.step(want.argmax(-1), ref_state)
        ref.append(want)
    out = {}
    for ops in modes:
        t = time.perf_counter()
        export_model(model, work / f"{spec.replace(':', '-')}-{ops}", ops=ops, force=True)
        export_s = time.perf_counter() - t
        runner = OrtRunner(work / f"{spec.replace(':', '-')}-{ops}", "cpu")
        got, state = runner.prefill(ids)
        worst, step_ms = rel_to_scale(got, ref[0])[0], []
        for i in range(steps):
            t = time.perf_counter()
            got, state = runner.step(ref[i].argmax(-1), state)
            step_ms.append((time.perf_counter() - t) * 1e3)
            worst = max(worst, rel_to_scale(got, ref[i + 1])[0])
        out[ops] = {"max_err_rel_to_scale": worst, "passed": worst <= LOGITS_REL[torch.float32],
                    "decode_step_ms_median": statistics.median(step_ms), "export_s": export_s}
        print(spec, ops, json.dumps(out[ops]), flush=True)
        del runner
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--models", nargs="+", default=["blackmamba-2.8b:2", "jamba-1.5-mini:1"])
    p.add_argument("--modes", nargs="+", default=["standard", "custom", "portable"])
    p.add_argument("--prompt", type=int, default=12)
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    import onnx
    import onnxruntime

    res = {"what": "ORT-CPU --ops standard / custom / portable vs the fp32 torch reference, full layer widths",
           "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
           "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "prompt": args.prompt, "steps": args.steps, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.models:
            res["models"][spec] = check(spec, args.modes, args.prompt, args.steps, Path(tmp))
            Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
