"""Tensor and expert parallelism over torch.distributed (NCCL on GPUs, gloo on CPUs): mesh.py (layout, groups,
collectives), shard.py (which slice each rank holds; the sharded model), layers.py (the layers that talk to other
ranks), load.py (slices from presets and checkpoints), runner.py (one rank behind the Runner interface), spawn.py
(a run driven from one process), launch.py (torchrun)."""
