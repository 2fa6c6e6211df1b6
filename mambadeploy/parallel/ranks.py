"""One rank's runner over its sharded model: shared by torchrun ranks (launch.py) and spawned workers (spawn.py), kept
apart from both so neither imports the other."""

from __future__ import annotations


def rank_runner(model, mesh, cuda_graph: bool = True, kernels: str = "torch"):
    """This rank's runner over its sharded model."""
    if kernels == "triton":
        from .fast import ParallelFastRunner  # lazily: torch-fast's kernels only when asked for

        return ParallelFastRunner(model, mesh, use_cuda_graph=cuda_graph)
    from .runner import ParallelRunner

    return ParallelRunner(model, mesh, cuda_graph=cuda_graph)
