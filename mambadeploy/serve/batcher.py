"""In-flight batching over any Runner: requests join the running decode batch between steps and leave it the moment
they finish or are cancelled.

One worker thread owns the runner and the SlotPool. Each turn of its loop:
  1. drops cancelled sequences (their rows are refilled at once by the last live row);
  2. admits every waiting request that fits into free rows at once: prompts of similar lengths share one left-padded
     prefill (prefill_groups; a padded batch gives each prompt what it gives alone), first tokens sampled and emitted;
  3. runs ONE decode step for every live sequence and emits each one's next token.
Requests are checked when submitted (`check`), so a bad one fails alone and never reaches the worker. Tokens are
handed to each request's `emit(token, index, latency_s, final)`; an exception inside the runner fails the sequences of
that call only.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from ..errors import InputError
from ..runtime.generate import MAX_NEW_TOKENS, check_finite, pad_prompts
from ..runtime.sampling import Sampler, SamplingConfig
from .slots import SlotPool

# A prefill of several prompts pads them to the longest: at most this much work for their real tokens.
PAD_WORK = 1.5


@dataclass
class Request:
    """One generation request; emit(token, index, latency_s, final) is called from the worker thread, fail(message)
    once when it cannot go on, cancelled() asked between steps (it must be cheap)."""
    prompt: list[int]
    max_tokens: int
    emit: object
    fail: object
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop_ids: tuple = ()
    cancelled: object = lambda: False
    arrived: float = field(default_factory=time.perf_counter)


@dataclass
class _Live:
    request: Request
    sampler: Sampler
    stop: frozenset
    emitted: int = 0
    cache_len: int = 0  # tokens in the sequence's KV cache (prompt + fed tokens)
    last_token: int = 0
    last_emit: float = 0.0
    ttft_s: float | None = None
    itl_s: list = field(default_factory=list)


@dataclass
class BatcherStats:
    """Counts and where the worker's time went (seconds, perf_counter): busy = whole turns with work; step = the
    decode step until its tokens are on the host (runner + pool + sampling); prefill = admission prefills; emit =
    handing tokens to the requests; busy - step - prefill - emit = bookkeeping (cancellation polls, admission
    grouping). admit_wait = arrival to the start of its prefill, summed over admitted requests."""
    steps: int = 0
    prefills: int = 0
    step_rows: int = 0  # live rows summed over steps (mean batch = step_rows / steps)
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    admitted: int = 0
    busy_s: float = 0.0
    step_s: float = 0.0
    prefill_s: float = 0.0
    emit_s: float = 0.0
    admit_wait_s: float = 0.0


class InflightBatcher:
    def __init__(self, runner, max_batch: int = 64, device=None, on_finish=None):
        """on_finish(ttft_s, itl_list_s) is called per completed sequence (metrics); `stats` and `live` may be read
        from another thread (approximate while it runs)."""
        self.runner = runner
        self.config = runner.config
        if hasattr(runner, "check_inputs"):  # torch-fast: ids are checked at submission; its own check syncs each step
            runner.check_inputs = False
        self.pool = SlotPool(runner, max_batch, device)
        self.max_batch = max_batch
        self.live: list[_Live] = []  # row i of the pool holds live[i]
        self.stats = BatcherStats()
        self.on_finish = on_finish
        self._inbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mambadeploy-batcher", daemon=True)

    # ------------------------------------------------------------------ caller side (any thread)
    def check(self, prompt, max_tokens: int, stop_ids=()) -> None:
        """Raise InputError for a request that cannot run (empty prompt, ids outside the vocabulary, too many tokens
        for the KV cache, max_tokens out of range)."""
        vocab = self.config.vocab_size
        if len(prompt) == 0:
            raise InputError("empty prompt: give at least one token")
        bad = sorted({t for t in prompt if not 0 <= t < vocab})
        if bad:
            raise InputError(f"token id(s) {bad[:5]} outside the vocabulary [0, {vocab})")
        bad = sorted({t for t in stop_ids if not 0 <= t < vocab})
        if bad:
            raise InputError(f"stop id(s) {bad[:5]} outside the vocabulary [0, {vocab})")
        if not 1 <= max_tokens <= MAX_NEW_TOKENS:
            raise InputError(f"max_tokens must be in [1, {MAX_NEW_TOKENS}], got {max_tokens}")
        limit = self.runner.max_length
        if limit is not None and len(prompt) + max_tokens - 1 > limit:
            raise InputError(f"prompt ({len(prompt)} tokens) + {max_tokens} new tokens exceed the attention KV cache "
                             f"of {limit} slots")

    def submit(self, request: Request) -> None:
        self.check(request.prompt, request.max_tokens, request.stop_ids)
        self._inbox.put(request)

    def start(self) -> InflightBatcher:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._inbox.put(None)  # wake the worker
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ worker
    def _loop(self) -> None:
        waiting: list[Request] = []
        with torch.no_grad():
            while not self._stop.is_set():
                block = not self.live and not waiting
                try:
                    waiting.append(self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait())
                    while True:
                        waiting.append(self._inbox.get_nowait())
                except queue.Empty:
                    pass
                waiting = [r for r in waiting if r is not None]  # None only wakes the worker
                if self._stop.is_set():
                    break
                started, had_work = time.perf_counter(), bool(self.live or waiting)
                try:
                    waiting = self._turn(waiting)
                except Exception as exc:  # noqa: BLE001 - never let the worker die with streams open
                    for seq in self.live:
                        seq.request.fail(f"internal error: {exc!r}")
                    self.live = []
                if had_work:
                    self.stats.busy_s += time.perf_counter() - started
        for seq in self.live:
            seq.request.fail("the server is shutting down")
        for r in waiting:
            r.fail("the server is shutting down")
        self.live = []

    def _turn(self, waiting: list) -> list:
        """Drop the cancelled, admit what fits, run one decode step; returns the requests still waiting."""
        self._drop_cancelled()
        free = self.max_batch - len(self.live)
        if waiting and free:
            admitted, waiting = waiting[:free], waiting[free:]
            self._admit([r for r in admitted if not _was_cancelled(r, self.stats)])
        if self.live:
            self._step()
        return waiting

    def _drop_cancelled(self) -> None:
        """Free the rows of cancelled sequences. cancelled() must be cheap: every live sequence is asked each turn
        (Triton's model reads a flag its watcher thread sets: asking Triton itself is a round trip to the server)."""
        for row in range(len(self.live) - 1, -1, -1):  # highest first: a move never touches a row still to ask
            if _was_cancelled(self.live[row].request, self.stats):
                self.live[row].request.fail("cancelled")  # closes the stream (FINAL) if the sender still takes it
                self._free(row)

    def _free(self, row: int) -> None:
        """Remove live[row]; the last live row moves into its place (rows stay [0, n))."""
        last = len(self.live) - 1
        self.pool.move(last, row)
        self.live[row] = self.live[last]
        self.live.pop()

    def _admit(self, requests: list[Request]) -> None:
        for group in prefill_groups(requests):
            ids, lengths = pad_prompts([r.prompt for r in group], pad_id=0)
            started = time.perf_counter()
            self.stats.admitted += len(group)
            self.stats.admit_wait_s += sum(started - r.arrived for r in group)
            try:
                logits, state = self.runner.prefill(ids, lengths)
                check_finite(logits, "prefill")
            except Exception as exc:  # noqa: BLE001 - one bad prefill fails its own requests, never the server
                for r in group:
                    self.stats.failed += 1
                    r.fail(f"prefill failed: {exc}")
                continue
            self.stats.prefills += 1
            first_row = len(self.live)
            self.pool.write(first_row, state)
            self.stats.prefill_s += time.perf_counter() - started
            for r in group:
                self.live.append(_Live(r, Sampler(r.sampling), frozenset(r.stop_ids), cache_len=len(r.prompt)))
            self._emit_rows(range(first_row, len(self.live)), self._sample(self.live[first_row:], logits, "prefill"))

    def _step(self) -> None:
        n = len(self.live)
        tokens = torch.tensor([s.last_token for s in self.live], dtype=torch.int64)
        filled = max(s.cache_len for s in self.live) if "pos" in self.pool.tensors else 0
        started = time.perf_counter()
        try:
            logits = self.pool.step(tokens, n, filled)  # copied into the pool's device buffer
            chosen = self._sample(self.live, logits, "decode step")  # the one sync: tokens + finite flag to the host
        except Exception as exc:  # noqa: BLE001 - the whole batch shared this step
            for s in self.live:
                self.stats.failed += 1
                s.request.fail(f"decode step failed: {exc}")
            self.live = []
            return
        self.stats.step_s += time.perf_counter() - started
        self.stats.steps += 1
        self.stats.step_rows += n
        for s in self.live:
            s.cache_len += 1
        self._emit_rows(range(n), chosen)

    def _emit_rows(self, rows, chosen: list[int]) -> None:
        """Emit chosen[i] to the sequence of rows[i], free the finished."""
        now = started = time.perf_counter()
        finished = []
        for row, token in zip(rows, chosen):
            s = self.live[row]
            s.last_token = token
            s.emitted += 1
            latency = now - (s.request.arrived if s.emitted == 1 else s.last_emit)
            if s.emitted == 1:
                s.ttft_s = latency
            else:
                s.itl_s.append(latency)
            s.last_emit = now
            final = s.emitted >= s.request.max_tokens or token in s.stop
            try:
                s.request.emit(token, s.emitted - 1, latency, final)
            except Exception:  # noqa: BLE001 - a client gone while sending: treat as cancelled
                final = True
            if final:
                finished.append(row)
                self.stats.finished += 1
                if self.on_finish is not None:
                    self.on_finish(s.ttft_s, s.itl_s)
        for row in sorted(finished, reverse=True):  # highest first: a move never touches a row still to free
            self._free(row)
        self.stats.emit_s += time.perf_counter() - started

    @staticmethod
    def _sample(seqs: list[_Live], logits: torch.Tensor, where: str) -> list[int]:
        """Greedy rows in one argmax, sampled rows each with their own seeded sampler; raises on NaN / Inf logits.
        All greedy (the common case): the tokens and the finite flag come to the host in ONE copy (each copy is a
        device sync, a visible share of a ~1 ms GPU step)."""
        if all(s.sampler.cfg.greedy for s in seqs):
            host = torch.cat([logits.argmax(-1), torch.isfinite(logits).all().view(1).to(torch.int64)]).tolist()
            if not host[-1]:
                check_finite(logits, where)  # raises, naming how many
            return host[:-1]
        check_finite(logits, where)
        greedy = [i for i, s in enumerate(seqs) if s.sampler.cfg.greedy]
        out = [0] * len(seqs)
        if greedy:
            picks = logits[greedy].argmax(-1).tolist()
            for i, t in zip(greedy, picks):
                out[i] = int(t)
        for i, s in enumerate(seqs):
            if not s.sampler.cfg.greedy:
                out[i] = int(s.sampler(logits[i:i + 1])[0])
        return out


def prefill_groups(requests: list[Request], pad_work: float = PAD_WORK) -> list[list[Request]]:
    """Requests admitted together, in prefills of left-padded prompts (a batch of different lengths gives each prompt
    what it gives alone: runtime.generate's contract): by length, a group grows while its padded work (longest x
    count) stays within pad_work x its real tokens. Equal lengths always share one prefill."""
    groups: list[list[Request]] = []
    real = 0
    for r in sorted(requests, key=lambda r: len(r.prompt)):
        n = len(r.prompt)
        if groups and n * (len(groups[-1]) + 1) <= pad_work * (real + n):
            groups[-1].append(r)
            real += n
        else:
            groups.append([r])
            real = n
    return groups


def _was_cancelled(request: Request, stats: BatcherStats) -> bool:
    try:
        gone = bool(request.cancelled())
    except Exception:  # noqa: BLE001 - asking a closed stream counts as cancelled
        gone = True
    if gone:
        stats.cancelled += 1
    return gone
