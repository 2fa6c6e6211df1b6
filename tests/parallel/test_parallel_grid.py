"""TP x EP on a 2 x 2 grid of 4 gloo processes: dense layers split over tensor-parallel pairs (two subgroups, copies
of each other), each MoE layer's experts split over 2 expert groups and each expert's width over the 2 ranks of its
group (every (expert, slice) on exactly one rank; one all-reduce over the 4 combines), tokens dispatched all-to-all.
Against the single-process reference as in test_parallel_runs.py (16 steps here: 4 processes on the CI's 2 cores)."""

from __future__ import annotations

from parallel_models import TIMEOUT_S, compare_greedy

from mambadeploy.parallel.spawn import SpawnedRunner


def test_grid_matches_single_process(tiny):
    grid = SpawnedRunner("jamba-tiny", "tp=2,ep=2,world=4,dispatch=alltoall", timeout_s=TIMEOUT_S)
    try:
        described = grid.describe()
        assert (described["world"], described["tp"], described["ep"]) == (4, 2, 2)
        compare_greedy(grid, tiny("jamba-tiny"), 512, steps=16)
    finally:
        grid.close()
