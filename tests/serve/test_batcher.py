"""In-flight batching without a server: sequences joining and leaving a running decode batch get the tokens each
prompt gets alone (runtime.generate), on the eager runner and on torch-fast's FastState over the pool's rows, one step
at a time and pipelined (step k+1 queued before step k's tokens are emitted: on the CPU the same code path, where the
device has finished every call when it returns)."""

from __future__ import annotations

import random
import threading

import pytest
from components import DEV_INSTALL, require_module

from mambadeploy.errors import InputError
from mambadeploy.runtime.factory import make_runner
from mambadeploy.runtime.generate import generate
from mambadeploy.runtime.sampling import SamplingConfig
from mambadeploy.serve.batcher import InflightBatcher, Request, prefill_groups
from mambadeploy.serve.slots import bucket_sizes

pytestmark = pytest.mark.usefixtures("no_grad")


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(64) == [1, 2, 4, 8, 16, 32, 64]
    assert bucket_sizes(12) == [1, 2, 4, 8, 12]


@pytest.mark.parametrize("lengths, groups", [
    ([128] * 64, [[128] * 64]),  # equal lengths: one prefill, no padding
    ([7, 1, 4], [[1], [4, 7]]),  # 1 with 4: 8 slots for 5 tokens (> 1.5x); 4 with 7: 14 slots for 11 tokens
    ([10, 9, 8, 12], [[8, 9, 10, 12]]),  # 48 slots for 39 tokens
    ([5], [[5]]),
])
def test_prefill_groups_bound_the_padding(lengths, groups):
    requests = [Request([1] * n, 1, None, None) for n in lengths]
    got = [[len(r.prompt) for r in g] for g in prefill_groups(requests)]
    assert got == groups
    assert sorted(id(r) for g in prefill_groups(requests) for r in g) == sorted(map(id, requests))


def _collect(batcher, prompts, max_tokens, cancel_after=None, stops=None, sampling=None, start=False):
    """Submit every prompt at once (start=True: then start the batcher, so that it admits them all in its first
    turn); returns (tokens per prompt, errors per prompt)."""
    outs = [[] for _ in prompts]
    errors = [None] * len(prompts)
    done = [threading.Event() for _ in prompts]

    def make(i):
        def emit(token, index, latency_s, final):
            assert index == len(outs[i]) and latency_s >= 0
            outs[i].append(token)
            if final:
                done[i].set()

        def fail(message):
            errors[i] = message
            done[i].set()

        gone = (lambda: len(outs[i]) >= cancel_after[i]) if cancel_after and cancel_after[i] else (lambda: False)
        return Request(prompts[i], max_tokens[i], emit, fail, cancelled=gone,
                       stop_ids=stops[i] if stops else (),
                       sampling=sampling[i] if sampling and sampling[i] else SamplingConfig())

    for i in range(len(prompts)):
        batcher.submit(make(i))
    if start:
        batcher.start()
    for event in done:
        assert event.wait(120), "a sequence never finished"
    return outs, errors


def _check_alone(runner, reference, prompts, max_tokens, max_batch, pipeline=None):
    """Serve every prompt through a batcher on `runner`; each must get reference's tokens for that prompt alone.
    Returns the (stopped) batcher."""
    batcher = InflightBatcher(runner, max_batch=max_batch, pipeline=pipeline).start()
    try:
        outs, errors = _collect(batcher, prompts, max_tokens)
    finally:
        batcher.stop()
    for prompt, n, out, err in zip(prompts, max_tokens, outs, errors):
        assert err is None
        assert out == generate(reference, [prompt], n).tokens[0]
    return batcher


@pytest.mark.parametrize("pipeline", [False, True], ids=["one-at-a-time", "pipelined"])
@pytest.mark.parametrize("name", ["blackmamba-tiny", "jamba-tiny"])
def test_joining_and_leaving_match_alone(tiny, name, pipeline):
    runner = make_runner(tiny(name), "torch")
    rng = random.Random(1)
    prompts = [[rng.randrange(runner.config.vocab_size) for _ in range(rng.randint(1, 7))] for _ in range(10)]
    max_tokens = [rng.randint(1, 9) for _ in prompts]  # sequences leave at different steps; 10 > 4 slots: a queue
    batcher = _check_alone(runner, runner, prompts, max_tokens, max_batch=4, pipeline=pipeline)
    print("steps", batcher.stats.steps, "mean batch", batcher.stats.step_rows / batcher.stats.steps)
    assert batcher.stats.step_rows > batcher.stats.steps  # sequences really shared steps
    assert not batcher.live
    # max_tokens is known ahead: a sequence leaves before a step past its end is queued, so none is wasted
    assert batcher.stats.wasted_rows == 0
    assert batcher.stats.sync_steps == (0 if pipeline else batcher.stats.steps)
    # every decode step fed each live row one token it then emitted: rows stepped = tokens - first tokens
    assert batcher.stats.step_rows == sum(max_tokens) - len(prompts)


@pytest.mark.parametrize("pipeline", [False, True], ids=["one-at-a-time", "pipelined"])
def test_cancelled_sequence_frees_its_row(tiny, pipeline):
    runner = make_runner(tiny("blackmamba-tiny"), "torch")
    prompts = [[3, 4, 5], [7], [9, 9, 1, 2]]
    batcher = InflightBatcher(runner, max_batch=2, pipeline=pipeline).start()
    try:  # the first asks for 10^6 tokens and leaves after 3: the third can only start in its row
        outs, errors = _collect(batcher, prompts, [10**6, 6, 6], cancel_after=[3, None, None])
    finally:
        batcher.stop()
    assert errors[0] == "cancelled" and len(outs[0]) >= 3
    for prompt, out, err in zip(prompts[1:], outs[1:], errors[1:]):
        assert err is None and out == generate(runner, [prompt], 6).tokens[0]
    assert batcher.stats.cancelled == 1
    assert not batcher.live and batcher._inflight is None


def _until_stop(tokens, stop):
    """tokens up to and including the first of `stop` (a served sequence ends there)."""
    for i, t in enumerate(tokens):
        if t in stop:
            return tokens[:i + 1]
    return tokens


@pytest.mark.parametrize("name", ["blackmamba-tiny", "jamba-tiny"])
def test_pipelined_stop_ids_cancel_and_admission(tiny, name):
    """Pipelined: sequences ending on a stop id (one step wasted each: it was queued before the stop was seen),
    one cancelled mid-stream, and a queue admitted while others run, with rows moving under a step in flight: every
    token is the one the prompt gets alone."""
    runner = make_runner(tiny(name), "torch")
    rng = random.Random(7)
    prompts = [[rng.randrange(runner.config.vocab_size) for _ in range(rng.randint(1, 6))] for _ in range(9)]
    max_tokens = [rng.randint(4, 12) for _ in prompts]
    alone = [generate(runner, [p], n).tokens[0] for p, n in zip(prompts, max_tokens)]
    # a stop id from the middle of its own output on every other sequence: it ends there, before max_tokens
    stops = [(out[len(out) // 2],) if i % 2 == 0 else () for i, out in enumerate(alone)]
    cancel_after = [None] * len(prompts)
    cancel_after[1] = 2  # sequence 1 (no stop id) goes away after 2 tokens
    batcher = InflightBatcher(runner, max_batch=3, pipeline=True).start()
    try:
        outs, errors = _collect(batcher, prompts, max_tokens, cancel_after=cancel_after, stops=stops)
    finally:
        batcher.stop()
    for i, (out, err, ref, stop) in enumerate(zip(outs, errors, alone, stops)):
        if i == 1:
            assert err == "cancelled" and out == ref[:len(out)] and len(out) >= 2
        else:
            assert err is None and out == _until_stop(ref, stop), f"sequence {i}"
    ended_early = sum(len(out) < n for out, n, e in zip(outs, max_tokens, errors) if e is None)
    print("steps", batcher.stats.steps, "wasted rows", batcher.stats.wasted_rows, "ended early", ended_early)
    assert ended_early >= 2 and batcher.stats.wasted_rows >= 1  # a stop id seen one step late wastes that row
    assert batcher.stats.wasted_rows <= ended_early + 1  # at most one wasted step each (+1: the cancelled one)
    assert batcher.stats.sync_steps == 0 and not batcher.live and batcher._inflight is None


def test_pipelined_with_a_sampled_sequence(tiny):
    """A sampled sequence needs its logits on the host before its next step: while it is live the steps run one at a
    time, then the pipeline resumes; the greedy sequences still get their tokens alone."""
    runner = make_runner(tiny("blackmamba-tiny"), "torch")
    prompts = [[5, 6, 7], [8, 9], [10], [11, 12, 13, 14]]
    max_tokens = [12, 12, 4, 12]
    sampling = [None, None, SamplingConfig(temperature=0.8, top_k=20, seed=3), None]
    batcher = InflightBatcher(runner, max_batch=4, pipeline=True).start()
    try:
        outs, errors = _collect(batcher, prompts, max_tokens, sampling=sampling)
    finally:
        batcher.stop()
    assert errors == [None] * 4 and len(outs[2]) == 4
    for i in (0, 1, 3):
        assert outs[i] == generate(runner, [prompts[i]], max_tokens[i]).tokens[0]
    stats = batcher.stats
    print("steps", stats.steps, "one at a time", stats.sync_steps)
    assert 3 <= stats.sync_steps < stats.steps  # the sampled one's 3 decode steps ran alone, the rest pipelined


class _NanAfter:
    """A runner whose decode step gives NaN logits in row 0 on its `k`-th call (and fine ones after)."""

    def __init__(self, runner, k):
        self.inner, self.k, self.calls = runner, k, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, tokens, state):
        logits, new = self.inner.step(tokens, state)
        self.calls += 1
        if self.calls == self.k:
            logits = logits.clone()
            logits[0, 3] = float("nan")
        return logits, new


@pytest.mark.parametrize("pipeline", [False, True], ids=["one-at-a-time", "pipelined"])
def test_non_finite_step_fails_its_batch_and_serving_goes_on(tiny, pipeline):
    runner = _NanAfter(make_runner(tiny("blackmamba-tiny"), "torch"), k=3)
    batcher = InflightBatcher(runner, max_batch=2, pipeline=pipeline).start()
    try:
        outs, errors = _collect(batcher, [[1, 2], [3]], [20, 20])
        assert all(e and "NaN or Inf" in e for e in errors), errors
        assert all(0 < len(o) < 20 for o in outs)
        outs, errors = _collect(batcher, [[4, 5]], [6])  # the batcher still serves
    finally:
        batcher.stop()
    assert errors == [None] and outs[0] == generate(runner.inner, [[4, 5]], 6).tokens[0]
    assert batcher.stats.failed == 2


@pytest.mark.parametrize("prompt, max_tokens, stop, message", [
    ([], 4, (), "empty prompt"),
    ([1, 600], 4, (), "outside the vocabulary"),
    ([1], 4, (700,), "stop id"),
    ([1], 0, (), "max_tokens"),
    ([1] * 10, 510, (), "KV cache"),  # jamba-tiny holds 512 slots
])
def test_bad_requests_refused_at_submit(tiny, prompt, max_tokens, stop, message):
    batcher = InflightBatcher(make_runner(tiny("jamba-tiny"), "torch"), max_batch=2)
    with pytest.raises(InputError, match=message):
        batcher.submit(Request(prompt, max_tokens, None, None, stop_ids=stop))


def test_torch_fast_pool_rows_match_eager(tiny):
    """torch-fast steps a FastState whose tensors are views of the pool (Triton's interpreter on CPU), fed from and
    picking into the pool's `feed` at the end of its step (the in-graph feedback on CUDA): a sequence that joins
    mid-way and rows that move when another leaves still give the eager tokens. Pipelined, as on CUDA (the pool's
    step is the same one at a time: the eager tests cover both orders)."""
    model = tiny("blackmamba-tiny")
    fast = make_runner(model, "torch-fast")
    eager = make_runner(model, "torch")
    prompts = [[5, 6, 7], [11], [2, 3]]
    max_tokens = [2, 3, 2]  # the third joins when the first leaves; the second moves to row 0
    batcher = _check_alone(fast, eager, prompts, max_tokens, max_batch=2, pipeline=True)
    assert set(batcher.pool._fast_states) <= {1, 2}
    for st in batcher.pool._fast_states.values():  # in place: the bucket states ARE the pool's rows and feed
        assert st.tensors["L0.ssm"].data_ptr() == batcher.pool.tensors["L0.ssm"].data_ptr()
        assert st.feedback and st.tokens.data_ptr() == batcher.pool.feed.data_ptr()


def test_ort_runner_behind_the_pool(tiny):
    """ORT runs the pool's rows through OrtValues made from the views (slots.py): same tokens as ORT alone."""
    require_module("onnxruntime", DEV_INSTALL)
    ort_runner = make_runner("blackmamba-tiny", "ort", cuda_graph=False)
    prompts = [[4, 8, 15], [16, 23], [42], [7, 7, 7, 7]]
    _check_alone(ort_runner, ort_runner, prompts, [5, 3, 6, 4], max_batch=3)


@pytest.mark.parametrize("pipeline", [False, True], ids=["one-at-a-time", "pipelined"])
def test_rows_move_only_for_sequences_that_stay(tiny, pipeline):
    """Sequences leaving together free their rows at once: only a staying sequence beyond the new end moves (a move
    copies a row of every state tensor), never a leaving one first."""
    runner = make_runner(tiny("blackmamba-tiny"), "torch")
    batcher = InflightBatcher(runner, max_batch=4, pipeline=pipeline)
    moves = []
    real_move = batcher.pool.move
    batcher.pool.move = lambda src, dst: (moves.append((src, dst)), real_move(src, dst))
    try:  # admitted together, in rows 0-3 (one prefill: equal lengths); rows 0-2 leave at the same step, row 3 stays
        prompts = [[1, 2], [3, 4], [5, 6], [7, 8]]
        outs, errors = _collect(batcher, prompts, [3, 3, 3, 6], start=True)
    finally:
        batcher.stop()
    assert errors == [None] * 4
    for prompt, n, out in zip(prompts, [3, 3, 3, 6], outs):
        assert out == generate(runner, [prompt], n).tokens[0]
    assert moves == [(3, 0)]


def test_fast_state_feedback_picks_on_device(tiny):
    """torch-fast with FastState.feedback: the step ends by writing each row's argmax into st.tokens (the next step's
    ids) and its finite flag into st.finite; the logits are those of the plain step. (A NaN row cannot be run here:
    Triton's CPU interpreter raises on NaN inside a kernel; test_non_finite_step_fails_its_batch_and_serving_goes_on
    covers the flag's path in the batcher.)"""
    import torch

    runner = make_runner(tiny("blackmamba-tiny"), "torch-fast")
    logits, st = runner.prefill(torch.tensor([[5], [8]]))
    plain = st.clone()
    ids = logits.argmax(-1)
    st.feedback = True
    st.tokens = ids.clone()
    runner.advance(st)
    expected, _ = runner.step(ids, plain)
    got = st.logits
    print("max abs diff", (got - expected).abs().max().item())
    assert torch.equal(got, expected)
    assert st.tokens.tolist() == expected.argmax(-1).tolist() and st.finite.tolist() == [1, 1]
    assert not torch.equal(st.tokens, ids)  # the picks really replaced the ids it was fed


def _serve_all(runner, prompts, max_tokens, max_batch, pipeline):
    """Every request queued before the batcher starts (the same admissions in either order); (tokens, stats)."""
    batcher = InflightBatcher(runner, max_batch=max_batch, pipeline=pipeline)
    try:
        outs, errors = _collect(batcher, prompts, max_tokens, start=True)
    finally:
        batcher.stop()
    assert errors == [None] * len(prompts)
    return outs, batcher.stats


def test_pipelined_runs_the_same_batches(tiny):
    """Pipelined, a sequence whose last token is on its way leaves before admission: the queue joins the same steps
    as one step at a time, so both run the same batches (and, on any device, give the same tokens)."""
    runner = make_runner(tiny("jamba-tiny"), "torch")
    rng = random.Random(3)
    prompts = [[rng.randrange(runner.config.vocab_size) for _ in range(rng.randint(1, 5))] for _ in range(7)]
    max_tokens = [rng.randint(2, 8) for _ in prompts]
    one, one_stats = _serve_all(runner, prompts, max_tokens, 3, pipeline=False)
    piped, piped_stats = _serve_all(runner, prompts, max_tokens, 3, pipeline=True)
    assert piped == one
    print("steps", one_stats.steps, "rows", one_stats.step_rows)
    assert (piped_stats.steps, piped_stats.step_rows, piped_stats.prefills) == (
        one_stats.steps, one_stats.step_rows, one_stats.prefills)


def test_pool_refuses_a_step_past_the_kv_cache(tiny):
    """The pool's step bypasses the runner's checks (the batcher checks at submission); a step that would write a KV
    slot past the cache is still refused on the host, before anything is queued."""
    from mambadeploy.serve.slots import SlotPool

    runner = make_runner(tiny("jamba-tiny"), "torch")
    pool = SlotPool(runner, 2)
    limit = runner.config.max_seq_len
    picks, finite = pool.launch(1, filled=limit - 1).result()  # the last slot: fine
    assert len(picks) == 1 and finite == [1]
    with pytest.raises(InputError, match="KV cache length"):
        pool.launch(1, filled=limit)
