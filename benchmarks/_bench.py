"""Shared measuring helpers for the benchmarks (GPU only): device facts, measured ceilings, GPU-time and host-time
measurement, JSON output. Timings are medians; GPU time comes from CUDA events around CUDA-graph replays (or around a
single long call), host time from the wall clock with no synchronisation inside the timed loop."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))



def device_facts() -> dict:
    import triton

    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def measured_ceilings() -> dict:
    """A 1 GiB device copy (bytes read + written) and an 8192^3 bf16 matmul, each the median of 10 after warm-up
    (random data, never zeros). The buffers are freed on return."""
    n = 1 << 29  # bf16 elements = 1 GiB
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_ms = gpu_ms(lambda: dst.copy_(src), reps=10)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = gpu_ms(lambda: a @ b, reps=10)
    from mambadeploy.validate.latency import datasheet

    sheet = datasheet(torch.cuda.get_device_name(0)) or {}  # the GPU's own datasheet (None: not in the table)
    return {"copy_bytes_per_s": 2 * n * 2 / (copy_ms * 1e-3), "bf16_matmul_flops": 2 * 8192 ** 3 / (mm_ms * 1e-3),
            "hbm_spec_bytes_per_s": sheet.get("hbm_bytes_per_s"), "bf16_spec_flops": sheet.get("bf16_flops"),
            "datasheet": sheet.get("label")}


def spec(ceilings: dict, name: str) -> float:
    """A datasheet ceiling of measured_ceilings(); NaN when the GPU is not in validate/latency.DATASHEET (its roofline
    shares then print as nan, the measured-ceiling shares beside them stay)."""
    value = ceilings.get(name)
    return float("nan") if value is None else value


def gpu_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median GPU milliseconds of fn() (events around each call; for calls long enough that launch gaps don't
    matter)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def captured_decode_step(model, **runner_kwargs):
    """A torch-fast runner on `model` with its batch-1 decode step captured: a seeded 16-token prompt prefilled, then
    4 steps of its greedy token (the first captures the graph). Returns (runner, state, the first step's logits)."""
    from mambadeploy.runtime.torch_fast import TorchFastRunner

    runner = TorchFastRunner(model, check_inputs=False, **runner_kwargs)
    g = torch.Generator(device="cuda").manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), generator=g, device="cuda")
    logits, state = runner.prefill(prompt)
    token = logits.argmax(-1)
    first = runner.step(token, state)[0].clone()
    for _ in range(3):
        runner.step(token, state)
    torch.cuda.synchronize()
    return runner, state, first


def wall_ms(fn, reps: int) -> float:
    """Median host wall time of `fn` in ms, synchronised before and after (includes launch cost)."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graph_ms_per_call(fn, calls: int = 50, reps: int = 10) -> float:
    """GPU milliseconds per fn() call: `calls` calls captured in one CUDA graph, replayed `reps` times (median), so
    host launch cost is excluded and back-to-back launches are as tight as a captured decode step's."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return gpu_ms(graph.replay, reps=reps, warmup=2) / calls


def host_us_per_call(fn, calls: int = 200) -> float:
    """Host (Python + launch) microseconds per fn() call: wall clock over `calls` calls with no sync inside the loop
    (the GPU queue absorbs the launches; valid while the GPU runs each call faster than the host issues it)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    return host / calls * 1e6


def write_json(name: str, data: dict) -> Path:
    """Into $OUT when set (the device runner), else benchmarks/results/."""
    gpu = data.get("device", {}).get("gpu", "cpu").lower().replace(" ", "_")
    out = Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}_{gpu}.json"
    path.write_text(json.dumps(data, indent=1, default=str))
    print(f"wrote {path}")
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table of rows (dicts) with the given columns."""
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
