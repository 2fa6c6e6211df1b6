"""How ranks split a model: the `Layout` parsed from `--parallel tp=2,ep=2`, the checks that it fits a model, and the
`Mesh` (this rank's coordinates, its process groups, and the collectives, each failure turned into one ParallelError).

Ranks form a grid of `world` processes:
- dense layers (Mamba mixers, attention, dense MLPs) are split over `tp` ranks: the tensor-parallel group of rank r is
  the `tp` consecutive ranks around it; with world > tp those groups are copies of each other;
- each MoE layer's experts are split over `ep` expert groups of world / ep consecutive ranks; inside a group each
  expert's hidden width is split over its world / ep ranks (expert tensor parallelism), so every (expert, slice)
  lives on exactly one rank and one all-reduce over the world combines the MoE output.
tp=2,ep=2 on 2 ranks: both splits use the same two ranks; on 4 ranks: two TP pairs, experts split 2 x 2.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch

from ..errors import ParallelError, RankFailure

DISPATCHES = ("auto", "mask", "alltoall")
# dispatch "auto": token batches of at least this many rows use all-to-all (prefill), smaller ones (decode) the mask
ALLTOALL_MIN_TOKENS = 256
DEFAULT_TIMEOUT_S = 120.0  # collectives; a dead or hung peer surfaces as an error after this


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    ep: int = 1
    world: int | None = None  # None: max(tp, ep), or the launcher's world size
    dispatch: str = "auto"  # MoE: "mask" (every rank has every token; local experts masked in), "alltoall", "auto"

    def text(self) -> str:
        return f"tp={self.tp},ep={self.ep},world={self.world},dispatch={self.dispatch}"


def parse_layout(text: str, world: int | None = None) -> Layout:
    """'tp=2,ep=2[,world=4][,dispatch=mask|alltoall|auto]' -> Layout; world: the launcher's (torchrun) world size."""
    values: dict = {}
    for part in (p.strip() for p in str(text).split(",") if p.strip()):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in ("tp", "ep", "world", "dispatch"):
            raise ParallelError(f"--parallel {text!r}: expected comma-separated tp=N, ep=N, world=N, "
                                f"dispatch=auto|mask|alltoall; got {part!r}")
        if key == "dispatch":
            if value not in DISPATCHES:
                raise ParallelError(f"--parallel {text!r}: dispatch must be one of {', '.join(DISPATCHES)}")
            values[key] = value
            continue
        try:
            values[key] = int(value)
        except ValueError:
            raise ParallelError(f"--parallel {text!r}: {key} must be a positive integer, got {value!r}") from None
        if values[key] < 1:
            raise ParallelError(f"--parallel {text!r}: {key} must be a positive integer, got {value}")
    layout = Layout(**values)
    given = layout.world
    if world is not None and given is not None and given != world:
        raise ParallelError(f"--parallel {text!r} names world={given} but {world} ranks were launched")
    size = world or given or max(layout.tp, layout.ep)
    return Layout(layout.tp, layout.ep, size, layout.dispatch)


def check_layout(layout: Layout, config) -> None:
    """Every way `layout` does not fit `config`, in one ParallelError."""
    W, tp, ep = layout.world, layout.tp, layout.ep
    problems = []
    if W % tp:
        problems.append(f"world size {W} is not a multiple of tp={tp}")
    if W % ep:
        problems.append(f"world size {W} is not a multiple of ep={ep}")
    kinds = {(s.mixer, s.ffn) for s in config.layers}
    mixers, ffns = {m for m, _ in kinds}, {f for _, f in kinds}
    if "mamba" in mixers and config.mamba.d_inner % tp:
        problems.append(f"Mamba d_inner {config.mamba.d_inner} is not divisible by tp={tp}")
    if "attention" in mixers:
        a = config.attention
        if a.n_heads % tp:
            problems.append(f"attention heads {a.n_heads} are not divisible by tp={tp}")
        if a.n_kv_heads % tp and tp % a.n_kv_heads:
            problems.append(f"KV heads {a.n_kv_heads} neither divide nor are divisible by tp={tp} (a KV head is "
                            "split over ranks, or replicated on tp / n_kv_heads ranks)")
    if "mlp" in ffns and config.mlp.ffn_size % tp:
        problems.append(f"dense MLP width {config.mlp.ffn_size} is not divisible by tp={tp}")
    if "moe" in ffns and not W % ep:
        if config.moe.n_experts % ep:
            problems.append(f"{config.moe.n_experts} experts are not divisible by ep={ep}")
        if config.moe.ffn_size % (W // ep):
            problems.append(f"expert width {config.moe.ffn_size} is not divisible by world/ep = {W // ep} "
                            "(each expert is split over the ranks of its expert group)")
    if problems:
        name = config.name or config.family
        raise ParallelError(f"--parallel tp={tp},ep={ep} on {W} ranks does not fit {name}: " + "; ".join(problems))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().split("\n")[0]
    return text[:300]


class Mesh:
    """This rank's place in the grid and the collectives the parallel layers call. world 1: every collective is a
    no-op (the single-GPU baseline of the benchmark runs the same code)."""

    def __init__(self, layout: Layout, rank: int, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.layout, self.rank, self.world, self.timeout_s = layout, rank, layout.world, timeout_s
        self.tp, self.ep = layout.tp, layout.ep
        self.tp_rank = rank % self.tp
        self.expert_tp = self.world // self.ep  # ranks per expert group
        self.ep_index, self.expert_tp_rank = rank // self.expert_tp, rank % self.expert_tp
        self.tp_group = None  # None: the whole world (tp == world) or no group needed (tp == 1)
        self.capturing = False  # set by the runner while a CUDA graph is captured (no host-synchronising dispatch)
        self.where = ""  # what the model is doing (for error messages)

    def make_groups(self) -> Mesh:
        """The tensor-parallel subgroups (only when 1 < tp < world); needs the joined process group. Every rank
        creates every group, in the same order, as torch.distributed requires."""
        if 1 < self.tp < self.world:
            import torch.distributed as dist

            for start in range(0, self.world, self.tp):
                group = self._run("creating the tensor-parallel groups",
                                  lambda start=start: dist.new_group(list(range(start, start + self.tp))))
                if start <= self.rank < start + self.tp:
                    self.tp_group = group
        return self

    def describe(self) -> dict:
        return {"rank": self.rank, "world": self.world, "tp": self.tp, "ep": self.ep, "dispatch": self.layout.dispatch,
                "tp_rank": self.tp_rank, "expert_group": self.ep_index, "expert_tp_rank": self.expert_tp_rank}

    # ------------------------------------------------------------------ collectives
    def _run(self, what: str, fn):
        try:
            return fn()
        except ParallelError:
            raise
        except Exception as exc:  # gloo / NCCL raise RuntimeError subclasses (DistBackendError, DistNetworkError)
            raise RankFailure(
                f"rank {self.rank} of {self.world}: {what}{' in ' + self.where if self.where else ''} failed: another "
                f"rank died, hung or left (collective timeout {self.timeout_s:g} s): {_first_line(exc)}") from exc

    def all_reduce_tp(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over this rank's tensor-parallel group, in place; returns t."""
        if self.tp > 1:
            import torch.distributed as dist

            self._run("all_reduce (tensor parallel)", lambda: dist.all_reduce(t, group=self.tp_group))
        return t

    def all_reduce_world(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            self._run("all_reduce (experts)", lambda: dist.all_reduce(t))
        return t

    def all_gather_world(self, t: torch.Tensor) -> torch.Tensor:
        """(n, ...) per rank -> (world * n, ...) in rank order."""
        if self.world == 1:
            return t
        import torch.distributed as dist

        out = torch.empty((self.world * t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
        self._run("all_gather (experts)", lambda: gather(out, t.contiguous()))
        return out

    def all_to_all(self, t: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        """Rows of t, send_counts[q] of them to rank q in order -> the rows every rank sent here, in rank order."""
        import torch.distributed as dist

        out = torch.empty((sum(recv_counts),) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
        self._run("all_to_all (experts)", lambda: dist.all_to_all_single(out, t.contiguous(), recv_counts, send_counts))
        return out

    def exchange_counts(self, send_counts: torch.Tensor) -> torch.Tensor:
        """(world,) int64 rows to send to each rank -> (world,) rows each rank will send here."""
        import torch.distributed as dist

        out = torch.empty_like(send_counts)
        self._run("all_to_all (expert counts)", lambda: dist.all_to_all_single(out, send_counts))
        return out

    def gather_object(self, value, what: str) -> list:
        """Every rank's `value` (picklable), in rank order."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        values: list = [None] * self.world
        self._run(f"gathering {what}", lambda: dist.all_gather_object(values, value))
        return values

    def check_same(self, value: str, what: str, label: str = "") -> None:
        """Every rank must hold the same `value` (a fingerprint); otherwise one ParallelError naming the ranks and
        what each holds (`label`: a preset name or path, shown but not compared: copies at other paths are fine)."""
        pairs = self.gather_object((value, label), what)
        if len({v for v, _ in pairs}) > 1:
            groups: dict = {}
            for r, (v, lab) in enumerate(pairs):
                groups.setdefault(v, ([], lab))[0].append(r)
            parts = [f"ranks {rs} have {lab or 'a model'} (fingerprint {v[:12]})" for v, (rs, lab) in groups.items()]
            raise ParallelError(f"ranks were launched with different {what}: " + "; ".join(parts))


def init_distributed(layout: Layout, rank: int, device: str, timeout_s: float = DEFAULT_TIMEOUT_S,
                     init_method: str | None = None) -> Mesh:
    """Join the process group (NCCL on CUDA, gloo on CPU; init_method None: torchrun's environment) and build the
    Mesh. Collectives time out after timeout_s, so a dead rank ends the others with an error instead of a hang."""
    if layout.world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if str(device).startswith("cuda") else "gloo"
            kwargs = {"device_id": torch.device(device)} if backend == "nccl" else {}
            try:
                dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=layout.world,
                                        timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
            except Exception as exc:
                raise ParallelError(f"rank {rank} of {layout.world}: could not join the process group within "
                                    f"{timeout_s:g} s ({_first_line(exc)})") from exc
    return Mesh(layout, rank, timeout_s).make_groups()
