"""Launch-config sweep on the GPU for the kernels whose block sizes matter most (selective_scan, the expert GEMV and
grouped GEMM), at the BlackMamba-2.8B shapes. Each config's output is checked against the default config's before it
is timed (GPU time, CUDA events, median). The winners are what launch_config() returns; rerun this after changing a
kernel.

Run: python benchmarks/sweep_kernels.py [--only scan|moe]
"""

from __future__ import annotations

import argparse

import torch
from _bench import device_facts, graph_ms_per_call, table, write_json
from bench_kernels import scan_inputs

from mambadeploy.kernels import moe_experts
from mambadeploy.kernels.selective_scan import launch_config as scan_config
from mambadeploy.kernels.selective_scan import selective_scan

BF16 = torch.bfloat16
# the single-launch associative-scan kernel (the TensorRT plugin's): (BLOCK_D, CHUNK, num_warps)
SCAN_CONFIGS = [(1, 64, 2), (2, 32, 1)]
# the segment-parallel kernel (the runner's): (BLOCK_D, num_warps, seg_len)
SEG_CONFIGS = [(bd, w, sl) for bd, w in ((16, 1), (32, 1), (32, 2), (64, 2))
               for sl in (16, 32, 64, 128)]


def _token_major(a):
    """The same values, stored (batch, L, features) as plain F.linear outputs are."""
    return {k: (v.transpose(1, 2).contiguous().transpose(1, 2) if v.dim() == 3 else v) for k, v in a.items()}


def sweep_scan(rows, L=2048, dim=2944):
    base = scan_inputs(1, dim, L)
    kw = dict(D=base["D"], z=base["z"], delta_bias=base["delta_bias"], delta_softplus=True)
    y0, h0 = selective_scan(base["u"], base["delta"], base["A"], base["B"], base["C"], **kw)
    default = scan_config((base["u"].shape, base["delta"].shape, base["A"].shape))
    cases = [("chunked", c) for c in SCAN_CONFIGS] + [("seg", c) for c in SEG_CONFIGS]
    for layout in ("channel-major", "token-major"):
        a = base if layout == "channel-major" else _token_major(base)
        kw = dict(D=a["D"], z=a["z"], delta_bias=a["delta_bias"], delta_softplus=True)
        for kind, c in cases:
            if kind == "chunked":
                block_d, chunk, warps = c
                cfg = {"kernel": "selective_scan_kernel", "grid": (1, triton_cdiv(dim, block_d)), "num_warps": warps,
                       "num_stages": 1, "constexprs": {"BLOCK_D": block_d, "BLOCK_N": 16, "CHUNK": chunk}}
            else:
                block_d, warps, seg_len = c
                n_seg = triton_cdiv(L, seg_len)
                cfg = {"kernel": "selective_scan_seg_kernel", "grid": (1, triton_cdiv(dim, block_d), n_seg),
                       "num_warps": warps, "num_stages": 1,
                       "constexprs": {"BLOCK_D": block_d, "BLOCK_N": 16},
                       "scalars": {"seg_len": seg_len, "n_seg": n_seg}}
            row = {"sweep": "selective_scan", "L": L, "layout": layout, "kernel": kind, "config": str(c),
                   "default": cfg == default}
            try:
                y, h = selective_scan(a["u"], a["delta"], a["A"], a["B"], a["C"], **kw, config=cfg)
                row["max_diff_vs_default"] = max((y.float() - y0.float()).abs().max().item(),
                                                 (h - h0).abs().max().item())
                row["gpu_us"] = graph_ms_per_call(lambda: selective_scan(a["u"], a["delta"], a["A"], a["B"], a["C"],
                                                                         **kw, config=cfg), calls=10, reps=5) * 1e3
            except Exception as exc:  # a config the compiler refuses (e.g. out of registers) is reported, not fatal
                row["error"] = str(exc).splitlines()[0][:120]
            rows.append(row)
            print(row, flush=True)


def triton_cdiv(a, b):
    return -(-a // b)


def _moe_cfg(path, T, k, d, F, E, c1, c2, block_m=None):
    P = T * k
    if path == "gemv":
        (n1, k1, w1), (n2, k2, w2) = c1, c2
        return {"path": "gemv",
                "fc1": {"grid": (P, triton_cdiv(F, n1)), "num_warps": w1, "num_stages": 3,
                        "constexprs": {"BLOCK_N": n1, "BLOCK_K": k1}},
                "fc2": {"grid": (P, triton_cdiv(d, n2)), "num_warps": w2, "num_stages": 3,
                        "constexprs": {"BLOCK_N": n2, "BLOCK_K": k2}}}
    n_blocks = triton_cdiv(P, block_m) + E
    (n1, bk1, w1, s1), (n2, bk2, w2, s2) = c1, c2
    return {"path": path, "align": {"block_m": block_m, "n_blocks": n_blocks},
            "fc1": {"grid": (n_blocks, triton_cdiv(F, n1)), "num_warps": w1, "num_stages": s1,
                    "constexprs": {"BLOCK_M": block_m, "BLOCK_N": n1, "BLOCK_K": bk1}},
            "fc2": {"grid": (n_blocks, triton_cdiv(d, n2)), "num_warps": w2, "num_stages": s2,
                    "constexprs": {"BLOCK_M": block_m, "BLOCK_N": n2, "BLOCK_K": bk2}}}


GEMV_CONFIGS = [((16, 256, 4), (8, 512, 4)), ((8, 512, 4), (8, 512, 4)), ((16, 128, 4), (16, 256, 4)),
                ((32, 128, 4), (8, 256, 2)), ((16, 256, 8), (16, 512, 8)), ((8, 256, 2), (4, 512, 2)),
                ((32, 256, 8), (16, 256, 4)), ((16, 512, 8), (8, 1024, 8))]
GEMM_CONFIGS = {  # T -> [(block_m, fc1 (BLOCK_N, BLOCK_K, warps, stages), fc2 (...))]
    8: [(16, (64, 64, 4, 3), (64, 64, 4, 3)), (16, (32, 128, 4, 4), (32, 128, 4, 4)),
        (16, (64, 128, 4, 4), (32, 256, 4, 3)), (16, (32, 256, 4, 3), (16, 256, 4, 3)),
        (16, (128, 64, 4, 4), (64, 128, 4, 4))],
    64: [(16, (64, 64, 4, 3), (64, 64, 4, 3)), (16, (32, 128, 4, 4), (32, 128, 4, 4)),
         (16, (64, 128, 4, 4), (32, 256, 4, 3)), (32, (64, 64, 4, 3), (64, 64, 4, 3)),
         (16, (128, 64, 4, 4), (64, 128, 4, 4))],
    2048: [(128, (128, 64, 8, 4), (256, 64, 8, 3)), (128, (128, 64, 8, 4), (128, 64, 8, 4)),
           (128, (128, 64, 8, 4), (128, 64, 4, 4)), (128, (128, 64, 8, 3), (64, 64, 4, 4)),
           (64, (128, 64, 4, 4), (128, 64, 4, 4)), (64, (128, 64, 8, 4), (128, 64, 8, 4)),
           (64, (256, 64, 8, 3), (128, 64, 4, 4)), (128, (256, 64, 8, 2), (128, 64, 8, 4)),
           (64, (128, 64, 4, 3), (64, 64, 4, 4)), (128, (64, 64, 4, 4), (128, 64, 8, 4)),
           (64, (64, 64, 4, 4), (64, 128, 4, 4))],
}
# the grouped GEMM with TMA weight (and h) tiles (moe_gemm_fc*_tma_kernel), prefill
TMA_CONFIGS = [(128, (128, 64, 8, 4), (128, 64, 8, 4)), (128, (128, 64, 8, 3), (128, 64, 8, 3)),
               (64, (128, 64, 4, 4), (128, 64, 4, 4)), (64, (128, 64, 4, 5), (128, 64, 4, 5)),
               (128, (64, 64, 4, 4), (128, 64, 8, 4)), (128, (128, 64, 8, 4), (256, 64, 8, 3)),
               (64, (64, 64, 4, 5), (64, 64, 4, 5)), (64, (256, 64, 8, 3), (256, 64, 8, 3)),
               (64, (128, 64, 8, 4), (128, 64, 8, 4)), (128, (128, 32, 8, 6), (128, 32, 8, 6))]


def sweep_moe(rows, d=1472, F=3872, E=8, tokens=(1, 8, 64, 2048)):
    g = torch.Generator(device="cuda").manual_seed(9)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, device="cuda") * scale  # noqa: E731
    w1, w2 = r(E, 2 * F, d, scale=d ** -0.5).to(BF16), r(E, d, F, scale=F ** -0.5).to(BF16)
    cases = [(1, "gemv", GEMV_CONFIGS)] * (1 in tokens) + [(T, "gemm", GEMM_CONFIGS[T]) for T in (8, 64, 2048)
                                                         if T in tokens]
    if 2048 in tokens:
        cases.append((2048, "gemm_tma", TMA_CONFIGS))
        x = r(2048, d).to(BF16)  # the ceiling: the same FLOPs as one dense expert over all tokens, on cuBLAS
        h = r(2048, F).to(BF16)
        fn = lambda: (torch.nn.functional.linear(x, w1[0]), torch.nn.functional.linear(h, w2[0]))  # noqa: E731
        us = graph_ms_per_call(fn, calls=5, reps=5) * 1e3
        rows.append({"sweep": "dense_cublas_same_flops", "T": 2048, "config": "cuBLAS", "gpu_us": us,
                     "tflops": 2 * 2048 * 3 * F * d / (us * 1e-6) / 1e12})
        print(rows[-1], flush=True)
    for T, path, configs in cases:
        x = r(T, d).to(BF16)
        experts = torch.randint(0, E, (T, 1), generator=g, device="cuda")
        weights = torch.rand(T, 1, generator=g, device="cuda")
        y0 = moe_experts.expert_gather(x, w1, w2, experts, weights, "gelu")
        n_exp = int(experts.unique().numel())
        for c in configs:
            if path == "gemv":
                cfg = _moe_cfg(path, T, 1, d, F, E, *c)
            else:
                cfg = _moe_cfg(path, T, 1, d, F, E, c[1], c[2], c[0])
            row = {"sweep": f"expert_gather_{path}", "T": T, "config": str(c), "experts_read": n_exp}
            try:
                y = moe_experts.expert_gather(x, w1, w2, experts, weights, "gelu", config=cfg)
                row["max_diff_vs_default"] = (y.float() - y0.float()).abs().max().item()
                fn = lambda: moe_experts.expert_gather(x, w1, w2, experts, weights, "gelu", config=cfg)  # noqa: E731
                row["gpu_us"] = graph_ms_per_call(fn, calls=10 if T <= 64 else 3, reps=5) * 1e3
                row["gbytes_per_s"] = n_exp * 3 * F * d * 2 / (row["gpu_us"] * 1e-6) / 1e9
                row["tflops"] = 2 * T * 3 * F * d / (row["gpu_us"] * 1e-6) / 1e12
            except Exception as exc:
                row["error"] = str(exc).splitlines()[0][:120]
            rows.append(row)
            print(row, flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["scan", "moe"])
    parser.add_argument("--moe-tokens", type=int, nargs="+", default=[1, 8, 64, 2048], choices=[1, 8, 64, 2048])
    parser.add_argument("--name", default="sweep", help="results file stem (a partial sweep should not replace the "
                                                        "full one's results/archive/sweep_*.json)")
    args = parser.parse_args()
    facts = device_facts()
    rows: list[dict] = []
    if args.only in (None, "scan"):
        sweep_scan(rows)
    if args.only in (None, "moe"):
        sweep_moe(rows, tokens=args.moe_tokens)
    write_json(args.name, {"device": facts, "rows": rows})
    print(table([r for r in rows if r["sweep"] == "selective_scan"],
                ["layout", "kernel", "config", "default", "gpu_us", "max_diff_vs_default", "error"]))
    print(table([r for r in rows if r["sweep"] != "selective_scan"],
                ["sweep", "T", "config", "gpu_us", "gbytes_per_s", "tflops", "max_diff_vs_default", "error"]))


if __name__ == "__main__":
    main()
