"""Decode GEMV tiles measured inside the whole batch-1 decode step (GPU): the dense projections' one-row tile
(kernels/gemv.py ROW_TILE) and the expert GEMV tiles (kernels/moe_experts.py GEMV_FC1_TILE / GEMV_FC2_TILE).

A kernel-level sweep re-reads the same weights call after call, so part of them sit in L2; in a real step every layer's
weights are cold, and a tile's registers decide how many programs share an SM and hence how many waves a launch takes.
So each variant here is the GPU time of one captured decode step (CUDA-graph replay, events, median of 50) of the same
model, with the tiles set before the runner is built; every variant's logits are checked against the default's.

Run: python benchmarks/sweep_decode_tiles.py [--preset blackmamba-2.8b]
"""

from __future__ import annotations

import argparse

import torch
from _bench import captured_decode_step, device_facts, gpu_ms, table, write_json

from mambadeploy.kernels import gemv, moe_experts, selective_state_update
from mambadeploy.models.checkpoint import build_preset

# (ROW_TILE, GEMV_FC1_TILE, GEMV_FC2_TILE); logits are compared with each list's first
VARIANTS = [  # the first sweep, with the earlier defaults first
    ((16, 512, None), (16, 512, 8), (8, 1024, 8)),
    ((8, 512, 4), (16, 512, 8), (8, 1024, 8)),
    ((16, 256, 8), (16, 512, 8), (8, 1024, 8)),
    ((8, 256, 4), (16, 512, 8), (8, 1024, 8)),
    ((16, 512, None), (16, 256, 8), (8, 1024, 8)),
    ((16, 512, None), (16, 256, 8), (8, 512, 4)),
    ((16, 512, None), (8, 512, 4), (8, 512, 4)),
    ((16, 512, None), (32, 256, 8), (16, 512, 8)),
    ((16, 512, None), (8, 256, 4), (4, 1024, 4)),
    ((8, 512, 4), (16, 256, 8), (8, 512, 4)),
]
# --variants row: the one-row tile alone around the first sweep's winner (8, 512, 4 warps), expert tiles default
ROW_VARIANTS = [(row, (16, 512, 8), (8, 1024, 8)) for row in (
    (16, 512, None), (8, 512, 4), (8, 512, 8), (8, 1024, 4), (8, 1024, 8), (4, 512, 4), (4, 1024, 4), (16, 512, 4),
    (8, 512, 2), (4, 512, 2), (8, 512, 4))]
# --variants moe: the expert GEMV tiles with the chosen one-row tile
MOE_VARIANTS = [((8, 512, 4), fc1, fc2) for fc1, fc2 in (
    ((16, 512, 8), (8, 1024, 8)), ((16, 512, 4), (8, 1024, 8)), ((8, 1024, 4), (8, 1024, 8)),
    ((32, 512, 8), (8, 1024, 8)), ((16, 512, 8), (8, 1024, 4)), ((16, 512, 8), (16, 1024, 8)),
    ((16, 512, 8), (4, 1024, 4)), ((16, 512, 8), (8, 512, 4)), ((8, 512, 4), (8, 1024, 8)))]
# --variants fc1: the expert fc1 tile around the moe sweep's winner (8, 512, 4 warps)
FC1_VARIANTS = [((8, 512, 4), fc1, (8, 1024, 8)) for fc1 in (
    (16, 512, 8), (8, 512, 4), (4, 512, 4), (8, 512, 2), (4, 512, 2), (8, 256, 4), (4, 1024, 4), (8, 512, 4))]
# --variants ssu / ssu2: the state update's batch-1 (BLOCK_D, warps) (selective_state_update.BATCH1_TILE; None = its
# rule, (16, 2) at this shape); ssu2 ran with (8, 1) as the default
SSU_VARIANTS = [None, (32, 2), (32, 4), (64, 4), (16, 1), (8, 1), (32, 1), (64, 2), None]
SSU2_VARIANTS = [(8, 1), (16, 2), (4, 1), (8, 2), (8, 1)]
# --variants rowdot: one row of x on the GEMV's tl.dot path (gemv.ROW_DOT_TILE: BLOCK_N, BLOCK_K, warps, stages; None =
# the FMA path with ROW_TILE), expert tiles as chosen
ROWDOT_VARIANTS = [None, (32, 128, 4, 4), (16, 128, 4, 4), (16, 256, 4, 4), (32, 256, 4, 3), (16, 128, 4, 6),
                   (64, 128, 4, 4), (16, 256, 8, 3), (8, 256, 4, 4), None]


def step_gpu_ms(model, reps=50) -> tuple[float, torch.Tensor]:
    _, state, first = captured_decode_step(model)
    return gpu_ms(state.graph.replay, reps=reps, warmup=0), first


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="blackmamba-2.8b")
    parser.add_argument("--name", default="sweep_decode_tiles")
    parser.add_argument("--variants", choices=["mixed", "row", "moe", "fc1", "ssu", "ssu2", "rowdot"], default="mixed")
    args = parser.parse_args()
    facts = device_facts()
    model = build_preset(args.preset, dtype=torch.bfloat16, device="cuda")
    saved = (gemv.ROW_TILE, moe_experts.GEMV_FC1_TILE, moe_experts.GEMV_FC2_TILE)
    saved_ssu, saved_dot = selective_state_update.BATCH1_TILE, gemv.ROW_DOT_TILE
    rows, reference = [], None
    with torch.no_grad():
        ssu_lists = {"ssu": SSU_VARIANTS, "ssu2": SSU2_VARIANTS}
        if args.variants in ssu_lists:
            variants = [saved + (v, saved_dot) for v in ssu_lists[args.variants]]
        elif args.variants == "rowdot":
            variants = [saved + (saved_ssu, v) for v in ROWDOT_VARIANTS]
        else:
            variants = [v + (saved_ssu, saved_dot) for v in {"mixed": VARIANTS, "row": ROW_VARIANTS,
                                                             "moe": MOE_VARIANTS, "fc1": FC1_VARIANTS}[args.variants]]
        for row_tile, fc1, fc2, ssu, row_dot in variants:
            gemv.ROW_TILE, moe_experts.GEMV_FC1_TILE, moe_experts.GEMV_FC2_TILE = row_tile, fc1, fc2
            selective_state_update.BATCH1_TILE, gemv.ROW_DOT_TILE = ssu, row_dot
            row = {"preset": args.preset, "row_tile": str(row_tile), "fc1_tile": str(fc1), "fc2_tile": str(fc2),
                   "ssu_tile": str(ssu), "row_dot_tile": str(row_dot)}
            try:
                row["step_gpu_ms"], logits = step_gpu_ms(model)
                if reference is None:
                    reference = logits
                row["max_logit_diff_vs_default"] = (logits - reference).abs().max().item()
            except Exception as exc:  # a tile the compiler refuses is reported, not fatal
                row["error"] = str(exc).splitlines()[0][:120]
            rows.append(row)
            print(row, flush=True)
            torch.cuda.empty_cache()
    gemv.ROW_TILE, moe_experts.GEMV_FC1_TILE, moe_experts.GEMV_FC2_TILE = saved
    selective_state_update.BATCH1_TILE, gemv.ROW_DOT_TILE = saved_ssu, saved_dot
    write_json(args.name, {"device": facts, "dtype": "bf16", "rows": rows})
    print(table(rows, ["row_tile", "fc1_tile", "fc2_tile", "ssu_tile", "row_dot_tile", "step_gpu_ms",
                       "max_logit_diff_vs_default", "error"]))


if __name__ == "__main__":
    main()
