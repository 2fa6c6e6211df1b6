"""selective_state_update launch tiles at the kernel level, ours against the mamba-ssm peer in the same process (GPU).

bench_kernels.py compares the state update with the peer's Triton kernel; with plain launches (MAMBADEPLOY_PDL=0,
like the peer's) ours used to trail at batch 1 and 8. This sweeps our batch-1 tile (selective_state_update.BATCH1_TILE:
BLOCK_D channels a program, warps), each case timed with bench_kernels.bench_ssu (CUDA-graph replay of 50 calls), so
every row has the peer's time beside it; batches 8 and 64 (the rule's tiles) are reported once.

Run: MAMBADEPLOY_PDL=0 python benchmarks/sweep_ssu_tiles.py   (carry .whl/kernels for the peer)
"""

from __future__ import annotations

import argparse
import os

from _bench import device_facts, measured_ceilings, table, write_json
from _peer import load_peer
from bench_kernels import bench_ssu

from mambadeploy.kernels import selective_state_update

BATCH1_TILES = [(8, 1), (16, 1), (16, 2), (32, 2), (32, 4), (64, 4), (4, 1)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="sweep_ssu_tiles")
    args = parser.parse_args()
    peer = load_peer()
    if peer is None:
        raise SystemExit("sweep_ssu_tiles: the mamba-ssm peer wheel is missing (see benchmarks/README.md)")
    facts, ceil = device_facts(), measured_ceilings()
    saved = selective_state_update.BATCH1_TILE
    rows = []
    try:
        for tile in BATCH1_TILES:
            selective_state_update.BATCH1_TILE = tile
            found: list[dict] = []
            bench_ssu(peer, ceil, found)
            for row in found:
                row.update(batch1_tile=str(tile), pdl=os.environ.get("MAMBADEPLOY_PDL", "1") != "0")
            rows.extend(r for r in found if r["batch"] == 1 or tile == saved)  # other batches once
    finally:
        selective_state_update.BATCH1_TILE = saved
    write_json(args.name, {"device": facts, "peer": getattr(peer, "wheel", None), "rows": rows})
    print(table(rows, ["batch", "dim", "batch1_tile", "pdl", "ours_gpu_us", "peer_gpu_us", "speedup_vs_peer",
                       "ours_rel_err"]))


if __name__ == "__main__":
    main()
