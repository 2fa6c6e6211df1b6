"""In-flight batching over any Runner: requests join the running decode batch between steps and leave it the moment
they finish or are cancelled.

One worker thread owns the runner and the SlotPool. Each turn of its loop:
  1. drops cancelled sequences, and (pipelined) those whose last token is on its way; their rows are refilled at once
     by the live rows beyond the new end (rows stay [0, n));
  2. admits every waiting request that fits into free rows at once: prompts of similar lengths share one left-padded
     prefill (prefill_groups; a padded batch gives each prompt what it gives alone), first tokens sampled and emitted;
  3. runs ONE decode step for every live sequence and emits each one's next token.
Requests are checked when submitted (`check`), so a bad one fails alone and never reaches the worker. Tokens are
handed to each request's `emit(token, index, latency_s, final)`; an exception inside the runner fails the sequences of
that call only.

Pipelined (the default where the pool overlaps: torch-fast on CUDA; `pipeline=True` runs the same order anywhere):
while every live sequence is greedy, step 3 QUEUES step k+1 first, then waits for step k's tokens and emits them, so
the host's work (emitting, freeing, admitting) runs while the device computes the next step. Step k+1 is fed on the
device with step k's picks (slots.py), so it needs nothing from the host. What follows:
- a step's tokens belong to the sequences that held its rows when it was queued (a snapshot): rows moved or freed
  afterwards change nothing for them;
- a sequence whose last token (max_tokens) is on its way leaves its row BEFORE the next step is queued, so it never
  computes past its end (nor writes a KV slot past the cache); one ended by a stop id, a cancellation or a failed emit
  has already been queued once more: that row's step is wasted (BatcherStats.wasted_rows) and its token dropped;
- a sampled sequence needs its logits on the host before the next step is fed: while one is live, steps run one at a
  time (queue, wait, sample, emit: BatcherStats.sync_steps), as do backends that do not overlap.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from ..errors import InputError, MambaDeployError
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
    row: int = -1  # its row of the pool while it holds one (-1: none)
    produced: int = 1  # tokens picked, or on their way in a queued step (the first comes from the prefill)
    emitted: int = 0
    ended: bool = False  # finished, cancelled or failed: a token still on its way is dropped
    cache_len: int = 0  # tokens in the sequence's KV cache (prompt + fed tokens)
    last_emit: float = 0.0
    ttft_s: float | None = None
    itl_s: list = field(default_factory=list)

    @property
    def greedy(self) -> bool:
        return self.sampler.cfg.greedy


@dataclass
class BatcherStats:
    """Counts and where the worker's time went (seconds, perf_counter): busy = whole turns with work; step = the
    worker's time in decode steps: queuing them plus waiting until their tokens are on the host (plus host sampling of
    sampled rows); wait = the part of step blocked on the device (near step: the device sets the pace; near 0: the
    host does and the device idles); prefill = admission prefills; emit = handing tokens to the requests;
    busy - step - prefill - emit = bookkeeping (cancellation polls, admission grouping, freeing rows).
    Pipelined, the host emits step k while step k+1 runs, so step + emit + bookkeeping per step is the interval
    between steps and step alone is the device's step time minus the host work it hides; one at a time (sync_steps),
    step is the whole step and emit + bookkeeping add to it. admit_wait = arrival to the start of its prefill, summed
    over admitted requests; wasted_rows = rows stepped for a sequence that had ended before its token arrived."""
    steps: int = 0
    sync_steps: int = 0  # steps run one at a time (a sampled row live, or a backend that does not overlap)
    prefills: int = 0
    step_rows: int = 0  # live rows summed over steps (mean batch = step_rows / steps)
    wasted_rows: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    admitted: int = 0
    busy_s: float = 0.0
    step_s: float = 0.0
    wait_s: float = 0.0
    prefill_s: float = 0.0
    emit_s: float = 0.0
    admit_wait_s: float = 0.0


class InflightBatcher:
    def __init__(self, runner, max_batch: int = 64, device=None, on_finish=None, pipeline: bool | None = None):
        """on_finish(ttft_s, itl_list_s) is called per completed sequence (metrics); `stats` and `live` may be read
        from another thread (approximate while it runs). pipeline: queue the next step before emitting this one's
        tokens (None: where the pool overlaps, i.e. torch-fast on CUDA)."""
        self.runner = runner
        self.config = runner.config
        if hasattr(runner, "check_inputs"):  # torch-fast: ids are checked at submission; its own check syncs each step
            runner.check_inputs = False
        self.pool = SlotPool(runner, max_batch, device)
        self.max_batch = max_batch
        self.pipeline = self.pool.overlaps if pipeline is None else bool(pipeline)
        self.live: list[_Live] = []  # row i of the pool holds live[i]
        self._sampled = 0  # live sequences that are not greedy
        self._inflight = None  # (LaunchedStep, the sequences of its rows) queued and not yet emitted
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
        inbox = self._inbox
        with torch.no_grad():
            while not self._stop.is_set():
                busy = bool(self.live or waiting or self._inflight)
                if not busy or inbox.qsize():  # qsize: no Empty exception raised and caught on every busy turn
                    try:
                        waiting.append(inbox.get(timeout=0.5) if not busy else inbox.get_nowait())
                        while True:
                            waiting.append(inbox.get_nowait())
                    except queue.Empty:
                        pass
                    waiting = [r for r in waiting if r is not None]  # None only wakes the worker
                if self._stop.is_set():
                    break
                started, had_work = time.perf_counter(), bool(self.live or waiting or self._inflight)
                try:
                    waiting = self._turn(waiting)
                except Exception as exc:  # noqa: BLE001 - never let the worker die with streams open
                    self._fail_open(f"internal error: {exc!r}")
                if had_work:
                    self.stats.busy_s += time.perf_counter() - started
        self._fail_open("the server is shutting down")
        for r in waiting:
            r.fail("the server is shutting down")

    def _turn(self, waiting: list) -> list:
        """Drop the cancelled and the spent, admit what fits, run one decode step; returns the requests still waiting.
        The spent leave before admission: their rows take new sequences in this turn, which join the next step as
        they would one step at a time (the same batches either way)."""
        self._drop_cancelled()
        self._retire_spent()
        free = self.max_batch - len(self.live)
        if waiting and free:
            admitted, waiting = waiting[:free], waiting[free:]
            self._admit([r for r in admitted if not _was_cancelled(r, self.stats)])
        try:
            if self.pipeline and not self._sampled:
                launched = self._launch() if self.live else None
                previous, self._inflight = self._inflight, launched
                if previous is not None:
                    self._finish(*previous)
            else:
                if self._inflight is not None:
                    previous, self._inflight = self._inflight, None
                    self._finish(*previous)
                if self.live:
                    self.stats.sync_steps += 1
                    self._finish(*self._launch(), sample=True)
        except Exception as exc:  # noqa: BLE001 - the whole batch shared this step
            self._fail_open(f"decode step failed: {exc}")
        return waiting

    def _fail_open(self, message: str) -> None:
        """Fail every sequence still expecting tokens: the live ones and those whose last token is on its way."""
        inflight = self._inflight[1] if self._inflight is not None else []
        for s in {id(s): s for s in self.live + inflight}.values():
            if not s.ended:
                s.ended = True
                self.stats.failed += 1
                s.request.fail(message)
        self.live, self._sampled, self._inflight = [], 0, None

    def _drop_cancelled(self) -> None:
        """Free the rows of cancelled sequences. cancelled() must be cheap: every live sequence is asked each turn
        (Triton's model reads a flag its watcher thread sets: asking Triton itself is a round trip to the server)."""
        gone = [s for s in self.live if _was_cancelled(s.request, self.stats)]
        for s in gone:
            s.ended = True
            s.request.fail("cancelled")  # closes the stream (FINAL) if the sender still takes it
        self._release(gone)

    def _retire_spent(self) -> None:
        """A sequence whose last token is on its way (pipelined) needs no further step; its row goes now."""
        self._release([s for s in self.live if s.produced >= s.request.max_tokens])

    def _release(self, leaving: list[_Live]) -> None:
        """The leaving sequences give up their rows; live rows stay [0, n) by moving only sequences that STAY from
        beyond the new end into the holes (a move copies a row of every state tensor: when many leave at once,
        e.g. a batch admitted together reaching max_tokens, none of them is moved first only to be freed after)."""
        leaving = [s for s in leaving if s.row >= 0]
        if not leaving:
            return
        keep = len(self.live) - len(leaving)
        holes = sorted(s.row for s in leaving if s.row < keep)
        for s in leaving:
            s.row = -1
            self._sampled -= not s.greedy
        movers = [s for s in self.live[keep:] if s.row >= 0]
        for hole, s in zip(holes, movers):
            self.pool.move(s.row, hole)
            self.live[hole] = s
            s.row = hole
        del self.live[keep:]

    def _admit(self, requests: list[Request]) -> None:
        for group in prefill_groups(requests):
            ids, lengths = pad_prompts([r.prompt for r in group], pad_id=0)
            started = time.perf_counter()
            self.stats.admitted += len(group)
            self.stats.admit_wait_s += sum(started - r.arrived for r in group)
            first_row = len(self.live)
            seqs = [_Live(r, Sampler(r.sampling), frozenset(r.stop_ids), row=first_row + i, cache_len=len(r.prompt))
                    for i, r in enumerate(group)]
            try:
                logits, state = self.runner.prefill(ids, lengths)
                chosen = self._sample(seqs, logits, "prefill")  # raises on NaN / Inf logits
            except Exception as exc:  # noqa: BLE001 - one bad prefill fails its own requests, never the server
                for r in group:
                    self.stats.failed += 1
                    r.fail(f"prefill failed: {exc}")
                continue
            self.stats.prefills += 1
            self.pool.write(first_row, state)
            self.pool.set_tokens(first_row, chosen)  # what each row is fed first (before a move can carry it)
            self.live.extend(seqs)
            self._sampled += sum(not s.greedy for s in seqs)
            self.stats.prefill_s += time.perf_counter() - started
            self._emit_rows(zip(seqs, chosen))

    def _launch(self):
        """Queue one decode step of every live row; returns (LaunchedStep, the sequences of its rows)."""
        started = time.perf_counter()
        filled = max(s.cache_len for s in self.live) if "pos" in self.pool.tensors else 0
        launched = self.pool.launch(len(self.live), filled)
        seqs = list(self.live)
        for s in seqs:
            s.produced += 1
            s.cache_len += 1
        self.stats.steps += 1
        self.stats.step_rows += len(seqs)
        self.stats.step_s += time.perf_counter() - started
        return launched, seqs

    def _finish(self, launched, seqs: list[_Live], sample: bool = False) -> None:
        """Wait for a queued step's tokens and emit them to the sequences that held its rows and are still open;
        sample=True (one step at a time): sampled rows pick from the step's logits, and feed their pick."""
        started = time.perf_counter()
        picks, finite = launched.result()
        self.stats.wait_s += time.perf_counter() - started
        rows = [r for r, s in enumerate(seqs) if not s.ended]
        self.stats.wasted_rows += len(seqs) - len(rows)
        bad = sum(not finite[r] for r in rows)
        if bad:
            raise MambaDeployError(f"decode step: the logits of {bad} of {len(seqs)} rows hold NaN or Inf; the "
                                   "weights or the runtime produced non-finite values (mambadeploy inspect "
                                   "CHECKPOINT checks the weights)")
        if sample and self._sampled:
            for r in rows:
                if not seqs[r].greedy:  # one at a time: its row is still r
                    picks[r] = int(seqs[r].sampler(launched.logits[r:r + 1])[0])
                    self.pool.set_tokens(r, [picks[r]])
        self.stats.step_s += time.perf_counter() - started
        self._emit_rows((seqs[r], picks[r]) for r in rows)

    def _emit_rows(self, pairs) -> None:
        """Emit each (sequence, token); the finished end and leave their rows."""
        now = started = time.perf_counter()
        finished = []
        for s, token in pairs:
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
                finished.append(s)
        for s in finished:
            s.ended = True
            self.stats.finished += 1
            if self.on_finish is not None:
                self.on_finish(s.ttft_s, s.itl_s)
        self._release(finished)
        self.stats.emit_s += time.perf_counter() - started

    @staticmethod
    def _sample(seqs: list[_Live], logits: torch.Tensor, where: str) -> list[int]:
        """The prefill's picks: greedy rows in one argmax, sampled rows each with their own seeded sampler; raises on
        NaN / Inf logits. All greedy (the common case): the tokens and the finite flag come to the host in ONE copy
        (each copy is a device sync)."""
        if all(s.greedy for s in seqs):
            host = torch.cat([logits.argmax(-1), torch.isfinite(logits).all().view(1).to(torch.int64)]).tolist()
            if not host[-1]:
                check_finite(logits, where)  # raises, naming how many
            return host[:-1]
        check_finite(logits, where)
        greedy = [i for i, s in enumerate(seqs) if s.greedy]
        out = [0] * len(seqs)
        if greedy:
            picks = logits[greedy].argmax(-1).tolist()
            for i, t in zip(greedy, picks):
                out[i] = int(t)
        for i, s in enumerate(seqs):
            if not s.greedy:
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
