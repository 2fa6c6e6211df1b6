"""DecodeAttention's ahead-of-time path against torch-fast's JIT launch of the same kernels (issue 21, item 4), GPU:
the TensorRT plugin's enqueue (plugins/aot_attention.py: slot write + split-K + combine, PTX loaded through CuPy) with
present aliased to the past caches and with separate present buffers (the enqueue then copies each cache), and
torch-fast's `decode_attention_update`, at Jamba's attention shape (32 query heads on 8 KV heads, head_dim 128) in a
--max-context cache, per tokens held. Checks every path against the `_ref` at a 4K cache first; then times (GPU time
per call, CUDA events over --iters calls, the Python enqueue included).

  python benchmarks/bench_decode_attention_aot.py --out benchmarks/results/decode_attention_aot_h200.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch

from mambadeploy.kernels.decode_attention import decode_attention_update, decode_attention_update_ref
from mambadeploy.plugins import aot_attention
from mambadeploy.validate.tolerances import assert_close_op

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def inputs(batch, slots, held, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, device="cuda").to(dtype)

    return [r(batch, HEADS, HEAD_DIM), r(batch, KV_HEADS, HEAD_DIM), r(batch, KV_HEADS, HEAD_DIM),
            r(batch, KV_HEADS, slots, HEAD_DIM), r(batch, KV_HEADS, slots, HEAD_DIM),
            torch.full((batch,), held - 1, device="cuda")]


def plugin_call(x, alias):
    """A closure running the plugin's enqueue on x's buffers (kernels compiled once, as an engine does)."""
    shapes = [tuple(t.shape) for t in x]
    dtypes = [str(t.dtype).removeprefix("torch.") for t in x]
    kernels = aot_attention.compile_launches(shapes, dtypes, {"scale": 0.0})
    workspace = torch.empty(aot_attention.workspace_bytes(shapes), dtype=torch.uint8, device="cuda")
    out = torch.empty_like(x[0])
    present = x[3:5] if alias else [torch.empty_like(t) for t in x[3:5]]
    stream = torch.cuda.current_stream().cuda_stream
    ptrs_in, ptrs_out = [t.data_ptr() for t in x], [out.data_ptr()] + [p.data_ptr() for p in present]

    def run():
        aot_attention.enqueue(kernels, ptrs_in, ptrs_out, workspace.data_ptr(), shapes, dtypes[0], stream)
        return out, *present

    return run


def gpu_ms(fn, iters):
    fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / iters


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-context", type=int, default=262144)
    ap.add_argument("--held", type=int, nargs="+", default=[2048, 32768, 131072, 262144])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args(argv)
    dtype = torch.bfloat16
    result = {"gpu": torch.cuda.get_device_name(), "host": platform.node(), "dtype": "bfloat16",
              "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "batch": args.batch,
                        "max_context": args.max_context}, "check": {}, "ms": {}}
    for alias in (True, False):  # check first, at a 4K cache
        x = inputs(args.batch, 4096, 4000, dtype)
        ref = decode_attention_update_ref(*x)
        got = plugin_call([t.clone() for t in x], alias)()
        for name, g, r in zip(("out", "present_key", "present_value"), got, ref):
            assert_close_op(g, r, dtype, f"plugin ({'aliased' if alias else 'copied'}) {name}")
        result["check"]["aliased" if alias else "copied"] = "passed"
    for held in args.held:
        x = inputs(args.batch, args.max_context, held, dtype)
        row = {"plugin_aliased": gpu_ms(plugin_call(x, True), args.iters),
               "plugin_copied": gpu_ms(plugin_call(x, False), max(3, args.iters // 10)),
               "torch_fast": gpu_ms(lambda x=x: decode_attention_update(*x), args.iters)}
        result["ms"][str(held)] = row
        print(f"held {held:>7}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in row.items()), flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
