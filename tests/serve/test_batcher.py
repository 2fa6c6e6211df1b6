"""In-flight batching without a server: sequences joining and leaving a running decode batch get the tokens each
prompt gets alone (runtime.generate), on the eager runner and on torch-fast's FastState over the pool's rows."""

from __future__ import annotations

import random
import threading

import pytest
from components import DEV_INSTALL, require_module

from mambadeploy.errors import InputError
from mambadeploy.runtime.factory import make_runner
from mambadeploy.runtime.generate import generate
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


def _collect(batcher, prompts, max_tokens, cancel_after=None):
    """Submit every prompt at once; returns (tokens per prompt, errors per prompt)."""
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
        return Request(prompts[i], max_tokens[i], emit, fail, cancelled=gone)

    for i in range(len(prompts)):
        batcher.submit(make(i))
    for event in done:
        assert event.wait(120), "a sequence never finished"
    return outs, errors


def _check_alone(runner, reference, prompts, max_tokens, max_batch):
    """Serve every prompt through a batcher on `runner`; each must get reference's tokens for that prompt alone.
    Returns the (stopped) batcher."""
    batcher = InflightBatcher(runner, max_batch=max_batch).start()
    try:
        outs, errors = _collect(batcher, prompts, max_tokens)
    finally:
        batcher.stop()
    for prompt, n, out, err in zip(prompts, max_tokens, outs, errors):
        assert err is None
        assert out == generate(reference, [prompt], n).tokens[0]
    return batcher


@pytest.mark.parametrize("name", ["blackmamba-tiny", "jamba-tiny"])
def test_joining_and_leaving_match_alone(tiny, name):
    runner = make_runner(tiny(name), "torch")
    rng = random.Random(1)
    prompts = [[rng.randrange(runner.config.vocab_size) for _ in range(rng.randint(1, 7))] for _ in range(10)]
    max_tokens = [rng.randint(1, 9) for _ in prompts]  # sequences leave at different steps; 10 > 4 slots: a queue
    batcher = _check_alone(runner, runner, prompts, max_tokens, max_batch=4)
    print("steps", batcher.stats.steps, "mean batch", batcher.stats.step_rows / batcher.stats.steps)
    assert batcher.stats.step_rows > batcher.stats.steps  # sequences really shared steps
    assert not batcher.live


def test_cancelled_sequence_frees_its_row(tiny):
    runner = make_runner(tiny("blackmamba-tiny"), "torch")
    prompts = [[3, 4, 5], [7], [9, 9, 1, 2]]
    batcher = InflightBatcher(runner, max_batch=2).start()
    try:  # the first asks for 10^6 tokens and leaves after 3: the third can only start in its row
        outs, errors = _collect(batcher, prompts, [10**6, 6, 6], cancel_after=[3, None, None])
    finally:
        batcher.stop()
    assert errors[0] == "cancelled" and len(outs[0]) >= 3
    for prompt, out, err in zip(prompts[1:], outs[1:], errors[1:]):
        assert err is None and out == generate(runner, [prompt], 6).tokens[0]
    assert batcher.stats.cancelled == 1


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
    """torch-fast steps a FastState whose tensors are views of the pool (Triton's interpreter on CPU): a sequence
    that joins mid-way and rows that move when another leaves still give the eager tokens."""
    model = tiny("blackmamba-tiny")
    fast = make_runner(model, "torch-fast")
    eager = make_runner(model, "torch")
    prompts = [[5, 6, 7], [11], [2, 3]]
    max_tokens = [2, 3, 2]  # the third joins when the first leaves; the second moves to row 0
    batcher = _check_alone(fast, eager, prompts, max_tokens, max_batch=2)
    assert set(batcher.pool._fast_states) <= {1, 2}
    assert all(st.tensors["L0.ssm"].data_ptr() == batcher.pool.tensors["L0.ssm"].data_ptr()
               for st in batcher.pool._fast_states.values())  # in place: the bucket states ARE the pool's rows


def test_ort_runner_behind_the_pool(tiny):
    """ORT runs the pool's rows through OrtValues made from the views (slots.py): same tokens as ORT alone."""
    require_module("onnxruntime", DEV_INSTALL)
    ort_runner = make_runner("blackmamba-tiny", "ort", cuda_graph=False)
    prompts = [[4, 8, 15], [16, 23], [42], [7, 7, 7, 7]]
    _check_alone(ort_runner, ort_runner, prompts, [5, 3, 6, 4], max_batch=3)
