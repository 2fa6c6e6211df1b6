"""Print the markdown tables of benchmarks/README.md and HISTORY.md from the committed JSON results (no GPU needed).

Reads results/ (the current run of each benchmark) and results/archive/ (superseded runs, sweeps and A/Bs); a table
built from an archived file says so in its heading.

Run: python benchmarks/tables.py [--gpu nvidia_h100_80gb_hbm3] [--current]   (--current: results/ only, README's tables)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _bench import table

RESULTS = Path(__file__).resolve().parent / "results"
ARCHIVE = RESULTS / "archive"
FOLDERS = [RESULTS, ARCHIVE]  # main() drops ARCHIVE under --current


def load(name, gpu):
    """The results file `name_gpu.json` from results/, else from results/archive/ (marked `archived`)."""
    for folder in FOLDERS:
        path = folder / f"{name}_{gpu}.json"
        if path.exists():
            return dict(json.loads(path.read_text()), archived=folder == ARCHIVE)
    return None


def where(data) -> str:
    """'GPU, date' of a results file (and whether it is archived): every table's heading names them."""
    return f"{data['device']['gpu']}, {data['device']['date']}" + ("; archived" if data.get("archived") else "")


def section(heading: str, rows: list, columns: list) -> None:
    print(f"### {heading}\n")
    print(table(rows, columns))
    print()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", default="nvidia_h100_80gb_hbm3")
    parser.add_argument("--current", action="store_true", help="only results/ (skip results/archive/)")
    args = parser.parse_args()
    gpu = args.gpu
    if args.current:
        FOLDERS.remove(ARCHIVE)
    decode = load("decode", gpu)
    if decode:
        rows = [dict(r, gb_read=r["bytes_per_token"] / 1e9) for r in decode["rows"]]
        section(f"Decode ({where(decode)}, bf16)", rows,
                ["preset", "batch", "pdl", "l2_prefetch", "fast_gpu_ms", "fast_wall_ms", "fast_host_us", "eager_ms",
                 "speedup_vs_eager", "gb_read", "floor_ms_spec", "roofline_pct_spec", "roofline_pct_copy"])
        print(table(decode["fp32_checks"], ["preset", "fp32_top1_agreement", "fp32_max_rel_err"]))
        print()
    timeline = load("timeline_decode", gpu)
    if timeline:
        for res in timeline["results"]:
            section(f"Decode step timeline, {res['preset']} batch 1, L2 prefetch {res['l2_prefetch']} "
                    f"({where(timeline)}): {res['step_gpu_ms']:.4f} ms, {res['kernels']} kernels", res["roles"],
                    ["role", "launches", "incr_us", "dur_us", "gap_us", "total_incr_us", "share_pct", "gbps"])
    pdl = [load(f"decode_pdl{flag}", gpu) for flag in (0, 1)]
    if all(pdl):
        section(f"Decode with PDL off / on ({where(pdl[0])}, bf16)", pdl[0]["rows"] + pdl[1]["rows"],
                ["preset", "batch", "pdl", "fast_gpu_ms", "fast_wall_ms", "roofline_pct_spec"])
    prefill = load("prefill", gpu)
    if prefill:
        section(f"Prefill ({where(prefill)}, bf16, batch 1)", prefill["rows"],
                ["preset", "tokens", "fast_ms", "fast_graphed_ms", "fast_gpu_kernel_ms", "eager_ms",
                 "speedup_vs_eager", "matmul_tflop", "roofline_pct_spec", "roofline_pct_measured", "check_max_rel_err",
                 "check_top1_equal"])
    l2 = [load(name, gpu) for name in ("decode_l2pf", "decode_l2pf_repeat")]
    if all(l2):
        section(f"Decode, L2 prefetch sites, two runs ({where(l2[0])} and {l2[1]['device']['date']}, bf16, 2.8B "
                f"batch 1)", l2[0]["rows"] + l2[1]["rows"],
                ["preset", "batch", "l2_prefetch", "fast_gpu_ms", "fast_wall_ms", "roofline_pct_spec"])
    prof = load("decode_profile_pdl0", gpu)
    if prof:
        section(f"Decode kernels, one ungraphed 2.8B batch-1 step, PDL off (true kernel durations) ({where(prof)})",
                prof["rows"][0]["profile"], ["kernel", "calls", "gpu_us"])
    for name, what in (("sweep_decode_tiles", "first sweep"), ("sweep_decode_row_tiles", "one-row GEMV tile"),
                       ("sweep_decode_moe_tiles", "expert GEMV tiles"), ("sweep_decode_fc1_tiles", "expert fc1 tile"),
                       ("sweep_decode_ssu_tiles", "state update tile"),
                       ("sweep_decode_ssu2_tiles", "state update tile, (8, 1) as the default")):
        sweep = load(name, gpu)
        if sweep:
            section(f"Decode tiles inside the whole 2.8B batch-1 step, {what} ({where(sweep)})", sweep["rows"],
                    ["row_tile", "fc1_tile", "fc2_tile", "ssu_tile", "step_gpu_ms", "max_logit_diff_vs_default",
                     "error"])
    final = load("decode_persistent_final", gpu)
    if final:
        section(f"Decode batch 1, persistent step vs per-kernel step, same run ({where(final)}, bf16)", final["rows"],
                ["preset", "batch", "persistent", "fast_gpu_ms", "fast_wall_ms", "roofline_pct_spec",
                 "speedup_vs_eager"])
    trace = load("trace_persistent_final", gpu)
    if trace:
        for res in trace["presets"]:
            section(f"Persistent step, program 0's timeline, {res['preset']} batch 1 ({where(trace)}): "
                    f"{res['step_ms']:.4f} ms captured, {res['n_regs']} registers, {res['n_spills']} spills",
                    res["rows"], ["phase", "count", "work_us", "prologue_us", "loop_us", "wait_us", "total_us"])
    sweeps = [path for folder in FOLDERS for path in sorted(folder.glob(f"trace_persistent_*_{gpu}.json"))]
    if sweeps:
        rows = []
        for path in sweeps:
            data = json.loads(path.read_text())
            for res in data["presets"]:
                rows.append({"file": path.name.replace(f"_{gpu}.json", ""), "step_ms": res["step_ms"],
                             "n_regs": res.get("n_regs"), "n_spills": res.get("n_spills"),
                             "tiles": res.get("tiles", ""), "prefetch": res.get("prefetch")})
        section("Persistent step launch shapes (2.8B batch 1, captured step)", rows,
                ["file", "tiles", "prefetch", "n_regs", "n_spills", "step_ms"])
    prof = load("prefill_bmm_profile", gpu)
    if prof:
        section(f"Prefill kernels, 2.8B, 2048 tokens ({where(prof)})", prof["rows"][0]["profile"],
                ["kernel", "calls", "gpu_us"])
    for name, title in (("kernels", "PDL on, as the runner launches them"), ("kernels_pdl_off", "PDL off")):
        kernels = load(name, gpu)
        if kernels:
            section(f"Kernels, {title} ({where(kernels)}; peer {kernels['peer']})", kernels["rows"],
                    ["kernel", "batch", "dim", "L", "ours_gpu_us", "peer_gpu_us", "speedup_vs_peer",
                     "peer_ref_gpu_us", "torch_ref_gpu_us", "ours_host_us", "peer_host_us", "ours_roofline_pct",
                     "ours_rel_err"])
    scan = load("sweep_scan_seg_graphed", gpu)
    if scan:
        section(f"Scan launch configs, L = 2048, CUDA-graph timing ({where(scan)})", scan["rows"],
                ["layout", "kernel", "config", "gpu_us", "max_diff_vs_default", "error"])
    for name in ("sweep_moe_tma_2048", "sweep_moe_2048", "sweep"):
        sweep = load(name, gpu)
        if sweep:
            section(f"Expert GEMV / grouped GEMM configs ({where(sweep)})",
                    [r for r in sweep["rows"] if r["sweep"] != "selective_scan"],
                    ["sweep", "T", "config", "gpu_us", "gbytes_per_s", "tflops", "error"])


if __name__ == "__main__":
    main()
