"""Kernel-level benchmark on the GPU: our Triton kernels vs the mamba-ssm peer and the PyTorch reference, at the
BlackMamba-1.5B/2.8B shapes. Each case is checked against the fp32 reference first, then timed.

  selective_state_update  batch 1, 8, 64; d_inner 2304 / 2944; N 16; bf16 in, fp32 state — ours vs mamba-ssm's
                          Triton kernel vs our torch reference. GPU time per call from CUDA-graph replays of 50 calls
                          (launch gaps as tight as in a captured decode step); host us/call measured apart.
  selective_scan          batch 1, L 512 / 2048 / 8192 — ours vs mamba-ssm's selective_scan_ref (PyTorch: its fast
                          Mamba-1 scan is a CUDA extension the pure-Python wheel does not contain).
  expert_gather, route_hidden, causal_conv1d_update, add_rms_norm  at decode shapes, vs the torch references.
Roofline: the fewest bytes each call must move (inputs read once, outputs written once) over its GPU time, as a share
of the H100 datasheet bandwidth (validate/latency.DATASHEET, by GPU name) and of the copy rate measured in the same run.

Run: python benchmarks/bench_kernels.py   (writes kernels_<gpu>.json into $OUT or benchmarks/results/)
"""

from __future__ import annotations

import argparse

import torch
from _bench import device_facts, gpu_ms, graph_ms_per_call, host_us_per_call, measured_ceilings, spec, table, write_json
from _peer import load_peer

from mambadeploy.kernels.causal_conv1d import causal_conv1d_update, causal_conv1d_update_ref
from mambadeploy.kernels.moe_experts import expert_gather, expert_gather_ref
from mambadeploy.kernels.moe_routing import route_hidden, route_ref
from mambadeploy.kernels.rms_norm import add_rms_norm, add_rms_norm_ref
from mambadeploy.kernels.selective_scan import selective_scan, selective_scan_ref
from mambadeploy.kernels.selective_state_update import selective_state_update, selective_state_update_ref

BF16 = torch.bfloat16


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item()


def ssu_inputs(batch, dim, N=16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, device="cuda") * scale  # noqa: E731
    return dict(state=r(batch, dim, N), x=r(batch, dim).to(BF16), dt=r(batch, dim, scale=0.5).to(BF16),
                A=-torch.rand(dim, N, generator=g, device="cuda") * N - 0.5, B=r(batch, N).to(BF16),
                C=r(batch, N).to(BF16), D=r(dim), z=r(batch, dim).to(BF16), dt_bias=r(dim, scale=0.5) - 2.0)


def bench_ssu(peer, ceil, rows):
    for dim in (2304, 2944):
        for batch in (1, 8, 64):
            a = ssu_inputs(batch, dim)
            args = lambda s: (s, a["x"], a["dt"], a["A"], a["B"], a["C"], a["D"], a["z"], a["dt_bias"])  # noqa: E731
            y_ref, s_ref = selective_state_update_ref(*args(a["state"]), dt_softplus=True)
            ours_state = a["state"].clone()
            y, _ = selective_state_update(*args(ours_state), dt_softplus=True)
            row = {"kernel": "selective_state_update", "batch": batch, "dim": dim,
                   "ours_rel_err": rel_err(y, y_ref), "ours_state_err": rel_err(ours_state, s_ref)}
            bytes_ = batch * dim * 16 * 4 * 2 + batch * dim * 2 * 4 + dim * 16 * 4 + dim * 8 + batch * 16 * 2 * 2
            st = a["state"].clone()
            row["ours_gpu_us"] = graph_ms_per_call(lambda: selective_state_update(*args(st), dt_softplus=True)) * 1e3
            row["ours_host_us"] = host_us_per_call(lambda: selective_state_update(*args(st), dt_softplus=True))
            if peer is not None:
                ps = a["state"].clone()
                py = peer.selective_state_update(*args(ps), dt_softplus=True)
                row["peer_rel_err"] = rel_err(py, y_ref)
                peer_call = lambda: peer.selective_state_update(*args(ps), dt_softplus=True)  # noqa: E731
                row["peer_gpu_us"] = graph_ms_per_call(peer_call) * 1e3
                row["peer_host_us"] = host_us_per_call(peer_call)
                row["speedup_vs_peer"] = row["peer_gpu_us"] / row["ours_gpu_us"]
            row["torch_ref_gpu_us"] = graph_ms_per_call(lambda: selective_state_update_ref(*args(a["state"]))) * 1e3
            row["bytes"] = bytes_
            row["ours_roofline_pct"] = 100 * bytes_ / (row["ours_gpu_us"] * 1e-6) / spec(ceil, "hbm_spec_bytes_per_s")
            rows.append(row)
            print(row)


def scan_inputs(batch, dim, L, N=16, seed=0):
    """Channel-major (time-contiguous) u/dt/z/B/C, the layout the torch-fast runner passes (and mamba-ssm's)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, device="cuda") * scale  # noqa: E731
    xdbl = r(batch, 2 * N, L).to(BF16)
    return dict(u=r(batch, dim, L).to(BF16), z=r(batch, dim, L).to(BF16), delta=r(batch, dim, L, scale=0.5).to(BF16),
                A=-torch.rand(dim, N, generator=g, device="cuda") * N - 0.5,
                B=xdbl[:, :N], C=xdbl[:, N:], D=r(dim), delta_bias=r(dim, scale=0.5) - 2.0)


def bench_scan(peer, ceil, rows, lengths):
    for dim in (2944,):
        for L in lengths:
            a = scan_inputs(1, dim, L)
            kw = dict(D=a["D"], z=a["z"], delta_bias=a["delta_bias"], delta_softplus=True)
            y, h = selective_scan(a["u"], a["delta"], a["A"], a["B"], a["C"], **kw)
            row = {"kernel": "selective_scan", "batch": 1, "dim": dim, "L": L}
            # CUDA-graph replays: the scan is 1-3 launches whose host cost (~20-40 us each) would otherwise show as
            # GPU idle time between the events at short lengths
            ours_ms = graph_ms_per_call(lambda: selective_scan(a["u"], a["delta"], a["A"], a["B"], a["C"], **kw),
                                        calls=10, reps=5)
            row["ours_gpu_us"] = ours_ms * 1e3
            bytes_ = dim * L * 2 * 4 + 2 * 16 * L * 2 + dim * 16 * 4 * 2
            row["bytes"] = bytes_
            row["ours_roofline_pct"] = 100 * bytes_ / (ours_ms * 1e-3) / spec(ceil, "hbm_spec_bytes_per_s")
            y_ref, h_ref = selective_scan_ref(a["u"], a["delta"], a["A"], a["B"], a["C"], **kw)
            row["ours_rel_err"], row["ours_state_err"] = rel_err(y, y_ref), rel_err(h, h_ref)
            del y_ref, h_ref
            if peer is not None:
                reps = 3 if L <= 2048 else 1
                row["peer_ref_gpu_us"] = gpu_ms(lambda: peer.selective_scan_ref(
                    a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"], a["delta_bias"], True, True),
                    reps=reps, warmup=1) * 1e3
                row["speedup_vs_peer_ref"] = row["peer_ref_gpu_us"] / row["ours_gpu_us"]
            torch.cuda.empty_cache()
            rows.append(row)
            print(row)


def bench_decode_kernels(ceil, rows):
    g = torch.Generator(device="cuda").manual_seed(3)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, device="cuda") * scale  # noqa: E731
    d, F, E, di = 1472, 3872, 8, 2944
    w1 = (r(E, 2 * F, d, scale=d ** -0.5)).to(BF16)
    w2 = (r(E, d, F, scale=F ** -0.5)).to(BF16)
    wr, br = r(E, d, scale=d ** -0.5).to(BF16), r(E).to(BF16)
    for batch in (1, 8, 64):
        x = r(batch, d).to(BF16)
        weights, experts = route_hidden(x, wr, br, "sigmoid_top1", 1)
        _, e_ref = route_ref(torch.nn.functional.linear(x.float(), wr.float(), br.float()), "sigmoid_top1", 1)
        y = expert_gather(x, w1, w2, experts, weights, "gelu")
        y_ref = expert_gather_ref(x, w1, w2, experts, weights, "gelu")
        n_exp = int(experts.unique().numel())
        bytes_ = n_exp * 3 * F * d * 2 + batch * d * 2 * 2
        row = {"kernel": "expert_gather", "batch": batch, "dim": d, "experts_read": n_exp,
               "ours_rel_err": rel_err(y, y_ref), "route_experts_equal": bool(torch.equal(experts, e_ref)),
               "ours_gpu_us": graph_ms_per_call(lambda: expert_gather(x, w1, w2, experts, weights, "gelu"),
                                                calls=20) * 1e3,
               "torch_ref_gpu_us": graph_ms_per_call(lambda: expert_gather_ref(x, w1, w2, experts, weights, "gelu"),
                                                     calls=5) * 1e3,
               "route_gpu_us": graph_ms_per_call(lambda: route_hidden(x, wr, br, "sigmoid_top1", 1)) * 1e3,
               "bytes": bytes_}
        row["ours_roofline_pct"] = 100 * bytes_ / (row["ours_gpu_us"] * 1e-6) / spec(ceil, "hbm_spec_bytes_per_s")
        rows.append(row)
        print(row)
        xs, cw, cb, cs = r(batch, di).to(BF16), r(di, 4).to(BF16), r(di).to(BF16), r(batch, di, 4)
        yc_ref, _ = causal_conv1d_update_ref(xs, cs, cw, cb, "silu")
        yc, _ = causal_conv1d_update(xs, cs.clone(), cw, cb, "silu")
        rows.append({"kernel": "causal_conv1d_update", "batch": batch, "dim": di, "ours_rel_err": rel_err(yc, yc_ref),
                     "ours_gpu_us": graph_ms_per_call(lambda: causal_conv1d_update(xs, cs, cw, cb, "silu")) * 1e3,
                     "torch_ref_gpu_us": graph_ms_per_call(
                         lambda: causal_conv1d_update_ref(xs, cs, cw, cb, "silu")) * 1e3})
        res, xn, wn = r(batch, d), r(batch, d).to(BF16), r(d).to(BF16)
        yn_ref, _ = add_rms_norm_ref(xn, res, wn, 1e-5)
        yn, _ = add_rms_norm(xn, res, wn, 1e-5)
        rows.append({"kernel": "add_rms_norm", "batch": batch, "dim": d, "ours_rel_err": rel_err(yn, yn_ref),
                     "ours_gpu_us": graph_ms_per_call(lambda: add_rms_norm(xn, res, wn, 1e-5)) * 1e3,
                     "torch_ref_gpu_us": graph_ms_per_call(lambda: add_rms_norm_ref(xn, res, wn, 1e-5)) * 1e3})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    args = parser.parse_args()
    peer = load_peer()
    facts = device_facts()
    ceil = measured_ceilings()
    print(facts, ceil)
    rows: list[dict] = []
    bench_ssu(peer, ceil, rows)
    bench_scan(peer, ceil, rows, args.lengths)
    bench_decode_kernels(ceil, rows)
    write_json("kernels", {"device": facts, "ceilings": ceil, "peer": getattr(peer, "wheel", None),
                           "method": "GPU time: CUDA-graph replay of many calls (decode kernels) or events around one "
                                     "call (selective_scan), median; host time: wall clock per call without sync",
                           "rows": rows})
    cols = ["kernel", "batch", "dim", "L", "ours_gpu_us", "peer_gpu_us", "peer_ref_gpu_us", "torch_ref_gpu_us",
            "speedup_vs_peer", "ours_host_us", "peer_host_us", "ours_roofline_pct", "ours_rel_err"]
    print(table(rows, cols))


if __name__ == "__main__":
    main()
