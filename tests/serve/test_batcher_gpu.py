"""The pipelined batcher on CUDA, where it is the default (torch-fast: picks inside each bucket's CUDA graph, one
asynchronous copy to pinned memory per step, moves and admissions queued behind the step in flight). GPU only:

    PYTHONPATH=$PWD python -m pytest -q tests/serve/test_batcher_gpu.py -s"""

from __future__ import annotations

import random

import pytest
import torch

from mambadeploy.runtime.factory import make_runner
from mambadeploy.runtime.generate import generate
from mambadeploy.serve.batcher import InflightBatcher

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("no_grad")]

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (run on the device machine)", allow_module_level=True)

from test_batcher import _collect, _until_stop  # after the skip; pytest puts tests/serve on sys.path


def _prompts(vocab, count, seed):
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(1, 9))] for _ in range(count)]
    return prompts, [rng.randint(2, 24) for _ in prompts]


@pytest.mark.parametrize("name", ["blackmamba-tiny", "jamba-tiny"])
def test_cuda_pipelined_equals_one_at_a_time(name):
    """A queue longer than the pool, sequences of different lengths: pipelined runs the same batches as one step at
    a time (test_batcher.test_pipelined_runs_the_same_batches), so on the same runner the tokens are identical."""
    runner = make_runner(name, "torch-fast", device="cuda")
    prompts, max_tokens = _prompts(runner.config.vocab_size, 12, seed=5)
    results = {}
    for pipeline in (False, True):
        batcher = InflightBatcher(runner, max_batch=5, pipeline=pipeline)
        try:
            outs, errors = _collect(batcher, prompts, max_tokens, start=True)
        finally:
            batcher.stop()
        assert errors == [None] * len(prompts)
        results[pipeline] = (outs, batcher.stats)
    (one, one_stats), (piped, piped_stats) = results[False], results[True]
    print("steps", piped_stats.steps, "waiting on the device", piped_stats.wait_s, "of", piped_stats.step_s, "s")
    assert piped == one
    assert (piped_stats.steps, piped_stats.step_rows) == (one_stats.steps, one_stats.step_rows)
    assert piped_stats.sync_steps == 0 and one_stats.sync_steps == one_stats.steps


@pytest.mark.parametrize("name", ["blackmamba-tiny", "jamba-tiny"])
def test_cuda_pipelined_stop_ids_and_cancel_match_alone(name):
    """One row (bucket 1, the same graph shape as generating alone): stop ids seen one step late (a wasted step each)
    and a cancellation mid-stream, one sequence after another through the same pool rows."""
    runner = make_runner(name, "torch-fast", device="cuda")
    prompts, max_tokens = _prompts(runner.config.vocab_size, 6, seed=9)
    alone = [generate(runner, [p], n).tokens[0] for p, n in zip(prompts, max_tokens)]
    stops = [(out[len(out) // 2],) if i % 2 == 0 else () for i, out in enumerate(alone)]
    cancel_after = [None, 2, None, None, None, None]
    batcher = InflightBatcher(runner, max_batch=1)
    assert batcher.pipeline  # the default on CUDA
    try:
        outs, errors = _collect(batcher, prompts, max_tokens, cancel_after=cancel_after, stops=stops, start=True)
    finally:
        batcher.stop()
    for i, (out, err, ref, stop) in enumerate(zip(outs, errors, alone, stops)):
        if cancel_after[i]:
            assert err == "cancelled" and out == ref[:len(out)]
        else:
            assert err is None and out == _until_stop(ref, stop), f"sequence {i}"
    print("steps", batcher.stats.steps, "wasted rows", batcher.stats.wasted_rows)
    assert batcher.stats.sync_steps == 0
