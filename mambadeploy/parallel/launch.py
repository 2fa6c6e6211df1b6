"""Where a parallel run's ranks come from: torchrun (its RANK / WORLD_SIZE / LOCAL_RANK environment, read here and
nowhere else), or, without it, workers spawned from this process (spawn.SpawnedRunner)."""

from __future__ import annotations

import atexit
import os

import torch

from ..errors import ParallelError
from .mesh import DEFAULT_TIMEOUT_S, init_distributed, parse_layout
from .ranks import rank_runner

KERNELS = ("torch", "triton")


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when launched by torchrun (or another env:// launcher), else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))


def make_parallel_runner(target, parallel: str = "tp=2", dtype="fp32", device="cpu",
                         timeout_s: float = DEFAULT_TIMEOUT_S, init: str = "exact", seed: int = 0,
                         cuda_graph: bool = True, kernels: str = "torch"):
    """-> (runner, is_main). Under torchrun: this rank's runner (cuda:LOCAL_RANK on a GPU); is_main on rank 0, which
    alone should print. Otherwise a SpawnedRunner driving `world` workers. kernels: "torch" (the sharded reference
    model; its decode step graphed on CUDA) or "triton" (decode on torch-fast's kernels: fast.ParallelFastRunner)."""
    if kernels not in KERNELS:
        raise ParallelError(f"unknown parallel kernels {kernels!r}; one of {', '.join(KERNELS)}")
    env = torchrun_env()
    if env is None:
        from .spawn import SpawnedRunner

        return SpawnedRunner(target, parallel, dtype, device, timeout_s, init, seed, cuda_graph, kernels=kernels), True
    from .load import load_sharded

    rank, world, local = env
    layout = parse_layout(parallel, world)
    dev = f"cuda:{local}" if str(device).startswith("cuda") else "cpu"
    if dev != "cpu":
        torch.cuda.set_device(dev)
    mesh = init_distributed(layout, rank, dev, timeout_s)
    atexit.register(_leave_group)
    model, _ = load_sharded(target, mesh, dtype, dev, seed, init)
    return rank_runner(model, mesh, cuda_graph, kernels), rank == 0


def _leave_group():
    """Leave together: a rank tearing its group down while a peer still talks to it can abort (seen with gloo)."""
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001, S110 - a peer already gone: nothing left to leave
            pass
