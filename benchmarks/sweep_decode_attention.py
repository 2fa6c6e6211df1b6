"""Decode-attention sweep on the GPU (issue 21): the split-K kernel's tiles, pipeline depth, warps and split count at the
Jamba-1.5-Mini attention shape (32 query heads, 8 KV heads, head_dim 128, bf16 KV) over a 256K-slot cache, at 2K / 32K /
128K / 256K tokens held, batch 1; plus batch 4 at a 32K cache. Every config is checked against decode_attention_ref
before it is timed (GPU time of CUDA-graph replays, median). Baselines in the same run: the default launch_config(), and
the previous kernel (broadcast products, 16-slot tiles) when its copy is present (`git show
601cd34:benchmarks/_decode_attention_v1.py > benchmarks/_decode_attention_v1.py`; the committed sweep ran with it).
The ceiling is a device copy measured in the same run. Effective bandwidth = the KV bytes a call must read / its time.

Run: python benchmarks/sweep_decode_attention.py [--quick]      (writes $OUT or results/sweep_decode_attention_<gpu>.json)
"""

from __future__ import annotations

import argparse
import itertools
import sys

import _decode_attention_v1 as v1
import torch
from _bench import device_facts, graph_ms_per_call, measured_ceilings, write_json

from mambadeploy.kernels import decode_attention as da

HEADS, KV, HD = 32, 8, 128


def kv_bytes(batch: int, held: int, dtype) -> int:
    return 2 * batch * KV * held * HD * torch.empty((), dtype=dtype).element_size()


def config(base: dict, block_n: int, stages: int, warps: int, splits: int, batch: int) -> dict:
    return dict(base, grid=(batch, KV, splits), splits=splits, num_warps=warps, num_stages=stages,
                constexprs=dict(base["constexprs"], BLOCK_N=block_n))


def run_case(batch: int, slots: int, fills: list[int], configs, dtype, rows: list, bw_copy: float):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(batch, HEADS, HD, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(batch, KV, slots, HD, device="cuda", dtype=torch.bfloat16, generator=g).to(dtype)
    v = torch.randn(batch, KV, slots, HD, device="cuda", dtype=torch.bfloat16, generator=g).to(dtype)
    base = da.launch_config((q.shape, k.shape))
    for held in fills:
        lens = torch.full((batch,), held, device="cuda", dtype=torch.int64)
        ref = da.decode_attention_ref(q, k, v, lens).float()
        scale = ref.abs().max().item()
        default = base["constexprs"]["BLOCK_N"], base["num_stages"], base["num_warps"], base["splits"]
        candidates = [("v1", None)] * (v1 is not None) + [("default", default)] + [("dot", c) for c in configs]
        for name, c in candidates:
            if name == "v1":
                fn = lambda: v1.decode_attention(q, k, v, lens)
                label = {"kernel": "v1 (broadcast, default config)"}
            else:
                block_n, stages, warps, splits = c
                cfg = config(base, block_n, stages, warps, splits, batch)
                fn = lambda cfg=cfg: da.decode_attention(q, k, v, lens, config=cfg)
                label = {"kernel": name, "block_n": block_n, "stages": stages, "warps": warps, "splits": splits}
            try:
                err = (fn().float() - ref).abs().max().item() / scale
                if err > 2e-2:
                    rows.append(dict(label, batch=batch, slots=slots, held=held, error=f"max err {err:.3g}"))
                    continue
                ms = graph_ms_per_call(fn, calls=20, reps=10)
            except Exception as exc:  # a config that does not compile (shared memory) is recorded, the sweep goes on
                rows.append(dict(label, batch=batch, slots=slots, held=held, error=repr(exc)[:200]))
                continue
            tbps = kv_bytes(batch, held, dtype) / (ms * 1e-3) / 1e12
            rows.append(dict(label, batch=batch, slots=slots, held=held, dtype=str(dtype), ms=ms, max_rel_err=err,
                             kv_tb_per_s=tbps, share_of_copy=tbps * 1e12 / bw_copy))
            print(f"b{batch} S{slots} held {held:>6} {name} {c}: {ms * 1e3:8.1f} us  {tbps:5.2f} TB/s  err {err:.1e}",
                  flush=True)
        del ref


def best(rows, **key):
    ok = [r for r in rows if "ms" in r and all(r.get(k) == v for k, v in key.items())]
    return min(ok, key=lambda r: r["ms"]) if ok else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few configs only")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("sweep_decode_attention: needs a GPU (run it through the device tool)")
    ceilings = measured_ceilings()
    bw_copy = ceilings["copy_bytes_per_s"]  # bytes read + written per second by a device copy
    if args.quick:
        configs = [(64, 3, 4, s) for s in (32, 128)]
    else:
        configs = list(itertools.product((32, 64, 128), (2, 3, 4), (4, 8), (32, 64, 128, 256)))
    rows: list = []
    run_case(1, 262144, [2048, 32768, 131072, 262071], configs, torch.bfloat16, rows, bw_copy)
    run_case(4, 32768, [2048, 32767], configs, torch.bfloat16, rows, bw_copy)
    # fp8 KV at the winning bf16 tile, 256K held
    fp8 = [c for c in configs if c[0] == 64 and c[2] == 4]
    run_case(1, 262144, [262071], fp8, torch.float8_e4m3fn, rows, bw_copy)
    winners = {f"b{b}_held{h}_{d}": best(rows, batch=b, held=h, dtype=d) for b, h, d in
               [(1, 2048, "torch.bfloat16"), (1, 131072, "torch.bfloat16"), (1, 262071, "torch.bfloat16"),
                (4, 32767, "torch.bfloat16"), (1, 262071, "torch.float8_e4m3fn")]}
    baseline = {f"b{b}_held{h}": best(rows, batch=b, held=h, kernel="v1 (broadcast, default config)")
                for b, h in [(1, 2048), (1, 131072), (1, 262071), (4, 32767)]}
    write_json("sweep_decode_attention", {"benchmark": "sweep_decode_attention", "device": device_facts(),
                                          "ceilings": ceilings, 
                                          "winners": winners, "baseline_v1": baseline, "rows": rows})
    for k, r in winners.items():
        print(k, r)


if __name__ == "__main__":
    main()
