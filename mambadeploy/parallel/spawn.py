"""SpawnedRunner: a tensor/expert-parallel run driven from one ordinary process (no torchrun), behind the Runner
interface, so `generate --backend parallel`, `validate --backends parallel` and the tests compare it with the
single-process reference in the same process.

It starts `world` worker processes (torch.multiprocessing, spawn), one per rank (cuda:r on a GPU machine, gloo on the
CPU), each holding a ParallelRunner; every call is sent to all of them, rank 0 answers with the logits. States live in
the workers; the handle returned here names one. A worker that dies, or answers with an error, ends the call with one
ParallelError naming the rank, within the collective timeout: the surviving workers see their collectives fail
(gloo: at once; otherwise after the timeout), report it and exit.
"""

from __future__ import annotations

import socket
import time
import weakref

import torch

from ..errors import MambaDeployError, ParallelError, RankFailure
from ..models.config import ModelConfig
from ..runtime.base import Runner
from .mesh import DEFAULT_TIMEOUT_S, check_layout, parse_layout

STARTUP_S = 300.0  # workers importing torch and loading their slices (a big checkpoint takes minutes)
WORKER_FAILED = 2
GRACE_S = 5.0  # once one rank failed, how long the others get to say what they saw (a hung one never will)


class StateHandle:
    """A state held by the workers (advanced in place by step)."""

    def __init__(self, runner: SpawnedRunner, sid: int, batch: int):
        self.sid, self.batch = sid, batch
        weakref.finalize(self, runner._free, sid)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, conn, settings):
    """One rank: join the group, load the slices, then serve calls until told to exit (or a collective fails)."""
    import os

    from .mesh import Mesh, init_distributed

    torch.set_num_threads(settings["threads"])
    device = f"cuda:{rank}" if settings["device"].startswith("cuda") else "cpu"
    runner, states, next_id = None, {}, 0
    cmd, payload = "load", settings
    while True:
        try:
            if cmd == "exit":
                break
            if cmd == "free":
                states.pop(payload, None)
                cmd, payload = conn.recv()
                continue
            if cmd == "load":
                if runner is None:
                    if device != "cpu":
                        torch.cuda.set_device(device)
                    mesh = init_distributed(payload["layout"], rank, device, settings["timeout_s"],
                                            settings["init_method"])
                else:
                    mesh = Mesh(payload["layout"], rank, settings["timeout_s"]).make_groups()
                runner, states = None, {}
                runner, fingerprint = _load(payload, mesh, device, settings)
                reply = {"describe": runner.describe(), "config": runner.config.to_dict(), "fingerprint": fingerprint}
            elif runner is None:
                raise ParallelError(f"rank {rank}: no model loaded (the last load failed)")
            elif cmd == "prefill":
                logits, states[next_id] = runner.prefill(*payload)
                reply = (logits.cpu() if rank == 0 else None, next_id)
                next_id += 1
            elif cmd == "step":
                tokens, sid = payload
                logits, states[sid] = runner.step(tokens, states[sid])
                reply = logits.cpu() if rank == 0 else None
            elif cmd == "state":
                full = runner.state_to_torch(states[payload])
                reply = {k: v.cpu() for k, v in full.items()} if rank == 0 else None
            else:
                raise ParallelError(f"rank {rank}: unknown command {cmd!r}")
            conn.send(("ok", reply))
        except RankFailure as exc:  # a collective failed: the group is unusable
            conn.send(("error", str(exc)))
            os._exit(WORKER_FAILED)
        except MambaDeployError as exc:  # bad input or a refused load: every rank refuses alike; the group still works
            conn.send(("error", str(exc)))
        cmd, payload = conn.recv()
    conn.close()
    os._exit(0)  # at once: tearing down gloo's threads at interpreter exit waited seconds for the peers


def _load(payload, mesh, device, settings):
    from .load import load_sharded
    from .ranks import rank_runner

    model, fingerprint = load_sharded(payload["target"], mesh, payload["dtype"], device, payload["seed"],
                                      payload["init"])
    return rank_runner(model, mesh, settings["cuda_graph"], settings["kernels"]), fingerprint


class SpawnedRunner(Runner):
    backend = "parallel"

    def __init__(self, target, parallel: str = "tp=2", dtype="fp32", device="cpu", timeout_s: float = DEFAULT_TIMEOUT_S,
                 init: str = "exact", seed: int = 0, cuda_graph: bool = True, threads: int = 1,
                 kernels: str = "torch"):
        """target: preset name or checkpoint directory (a path: workers load it themselves, slices only).
        parallel: the layout ('tp=2,ep=2[,world=4][,dispatch=...]'). timeout_s: collective timeout."""
        if not isinstance(target, str) and not hasattr(target, "__fspath__"):
            raise ParallelError("the parallel backend loads the model in its workers: give a preset name or a "
                                "checkpoint directory, not a loaded model")
        self.layout = parse_layout(parallel)
        from .load import config_of

        check_layout(self.layout, config_of(str(target)))  # refused here, before any worker starts
        if str(device).startswith("cuda") and torch.cuda.device_count() < self.layout.world:
            raise ParallelError(f"--parallel needs {self.layout.world} GPUs, {torch.cuda.device_count()} visible")
        self.timeout_s = timeout_s
        settings = {"target": str(target), "layout": self.layout, "dtype": dtype, "device": str(device),
                    "timeout_s": timeout_s, "init": init, "seed": seed, "cuda_graph": cuda_graph, "threads": threads,
                    "kernels": kernels,
                    "init_method": f"tcp://127.0.0.1:{_free_port()}"}
        ctx = torch.multiprocessing.get_context("spawn")
        self.conns, self.procs = [], []
        for rank in range(self.layout.world):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(rank, child, settings), daemon=True,
                               name=f"mambadeploy-rank{rank}")
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        try:
            ready = self._collect(STARTUP_S + timeout_s)
        except BaseException:
            self.close()
            raise
        self.config = ModelConfig.from_dict(ready[0]["config"])
        self._describe = ready[0]["describe"]

    def load(self, target, parallel: str | None = None, dtype="fp32", init: str = "exact", seed: int = 0,
             targets: list | None = None):
        """Load another model (or the same under another layout of the same world) into the running workers.
        targets: one per rank instead of `target` (tests: ranks given different checkpoints must be refused)."""
        layout = parse_layout(parallel, self.layout.world) if parallel else self.layout
        payloads = [{"target": str(t), "layout": layout, "dtype": dtype, "init": init, "seed": seed}
                    for t in (targets or [target] * self.layout.world)]
        ready = self._call("load", payloads=payloads)
        self.layout = layout
        self.config = ModelConfig.from_dict(ready["config"])
        self._describe = ready["describe"]

    # ------------------------------------------------------------------ messaging
    def _call(self, cmd, payload=None, payloads=None):
        for r, conn in enumerate(self.conns):
            try:
                conn.send((cmd, payload if payloads is None else payloads[r]))
            except (BrokenPipeError, OSError):
                pass  # that worker is gone: _collect says which
        return self._collect(self.timeout_s + 30.0)[0]

    def _collect(self, limit_s: float) -> list:
        """Every rank's reply; a dead rank or an error reply becomes one ParallelError (after the others answer, die
        or the limit passes: their messages say what they saw)."""
        replies, errors, deadline = {}, {}, time.monotonic() + limit_s
        pending = set(range(len(self.conns)))
        while pending and time.monotonic() < deadline:
            for r in sorted(pending):
                conn, proc = self.conns[r], self.procs[r]
                try:
                    has = conn.poll(0.02)
                except (EOFError, OSError):
                    has = False
                if has:
                    try:
                        status, value = conn.recv()
                    except (EOFError, OSError):
                        status, value = "error", None
                    pending.discard(r)
                    (replies if status == "ok" else errors)[r] = value
                elif not proc.is_alive():
                    pending.discard(r)
                    errors[r] = None
                if errors:
                    deadline = min(deadline, time.monotonic() + GRACE_S)
        if pending:
            errors.update({r: f"rank {r}: no answer (hung?)" for r in pending})
        if errors:
            raise ParallelError(self._explain(errors))
        return [replies[r] for r in range(len(self.conns))]

    def _explain(self, errors: dict) -> str:
        dead = []
        for r in sorted(r for r, msg in errors.items() if msg is None):
            self.procs[r].join(1)
            code = self.procs[r].exitcode
            dead.append(f"rank {r} died ({f'killed by signal {-code}' if code and code < 0 else f'exit code {code}'})")
        said = list(dict.fromkeys(msg for _, msg in sorted(errors.items()) if msg))  # every rank may say the same
        return "; ".join(dead + said[:2]) or "a worker failed"

    def _free(self, sid):
        if all(p.is_alive() for p in self.procs):
            for conn in self.conns:
                try:
                    conn.send(("free", sid))
                except (BrokenPipeError, OSError):
                    pass

    def close(self):
        for conn, proc in zip(self.conns, self.procs):
            if proc.is_alive():
                try:
                    conn.send(("exit", None))
                except (BrokenPipeError, OSError):
                    pass
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(1)

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown
            pass

    # ------------------------------------------------------------------ runner interface
    def prefill(self, input_ids, lengths=None):
        ids = input_ids.cpu()
        logits, sid = self._call("prefill", (ids, None if lengths is None else lengths.cpu()))
        return logits, StateHandle(self, sid, ids.shape[0])

    def step(self, token_ids, state: StateHandle):
        return self._call("step", (token_ids.reshape(-1).cpu(), state.sid)), state

    def state_to_torch(self, state: StateHandle) -> dict:
        return self._call("state", state.sid)

    def describe(self) -> dict:
        return dict(self._describe, launcher="spawn")
