"""Where a parallel run's ranks come from: torchrun (its RANK / WORLD_SIZE / LOCAL_RANK environment, read here and
nowhere else), or, without it, workers spawned from this process (spawn.SpawnedRunner)."""

from __future__ import annotations

import atexit
import os

import torch

from .mesh import DEFAULT_TIMEOUT_S, init_distributed, parse_layout


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when launched by torchrun (or another env:// launcher), else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def make_parallel_runner(target, parallel: str = "tp=2", dtype="fp32", device="cpu",
                         timeout_s: float = DEFAULT_TIMEOUT_S, init: str = "exact", seed: int = 0,
                         cuda_graph: bool = True):
    """-> (runner, is_main). Under torchrun: this rank's ParallelRunner (cuda:LOCAL_RANK on a GPU); is_main on rank 0,
    which alone should print. Otherwise a SpawnedRunner driving `world` workers."""
    env = torchrun_env()
    if env is None:
        from .spawn import SpawnedRunner

        return SpawnedRunner(target, parallel, dtype, device, timeout_s, init, seed, cuda_graph), True
    from .load import load_sharded
    from .runner import ParallelRunner

    rank, world, local = env
    layout = parse_layout(parallel, world)
    dev = f"cuda:{local}" if str(device).startswith("cuda") else "cpu"
    if dev != "cpu":
        torch.cuda.set_device(dev)
    mesh = init_distributed(layout, rank, dev, timeout_s)
    atexit.register(_leave_group)
    model, _ = load_sharded(target, mesh, dtype, dev, seed, init)
    return ParallelRunner(model, mesh, cuda_graph=cuda_graph), rank == 0


def _leave_group():
    """Leave together: a rank tearing its group down while a peer still talks to it can abort (seen with gloo)."""
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception:  # a peer already gone: nothing left to leave
            pass
