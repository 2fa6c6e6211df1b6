"""Two ranks over gloo (worker processes spawned once for the module, models loaded into them in turn) against the
single-process reference: every tiny preset and a transformers-built Jamba under TP=2, EP=2 and TP x EP (both splits
over the same 2 ranks), with both MoE dispatches; 64 greedy decode steps, logits within PARALLEL_LOGITS_REL of the
logit scale, tokens identical, the gathered state equal to the reference state. Then the failure paths: ranks given
different checkpoints, and a killed rank (the survivor exits within the collective timeout, saying why).
The 4-rank grid (tp=2 x ep=2 on 4 processes) runs through torchrun in test_parallel_cli.py."""

from __future__ import annotations

import time

import pytest
import torch
from parallel_models import TIMEOUT_S, compare_greedy, save_hf_jamba

from mambadeploy.errors import ParallelError
from mambadeploy.models.checkpoint import load_model, save_model
from mambadeploy.models.presets import TINY_PRESETS
from mambadeploy.parallel.spawn import WORKER_FAILED, SpawnedRunner
from mambadeploy.validate.tolerances import PARALLEL_LOGITS_REL, rel_to_scale

STEPS = 64


@pytest.fixture(scope="module")
def hf_jamba(tmp_path_factory):
    """(checkpoint directory, its single-process model)."""
    path = save_hf_jamba(tmp_path_factory.mktemp("hf_jamba_runs"))
    return path, load_model(path)


@pytest.fixture(scope="module")
def pool():
    runner = SpawnedRunner("blackmamba-tiny", "tp=2", timeout_s=TIMEOUT_S)
    yield runner
    runner.close()


# TP, EP, TP x EP (tp=2,ep=2 on 2 ranks: experts split over the same ranks as the mixers) for every model; the
# all-to-all dispatch on the presets (sigmoid top-1, softmax top-1, softmax top-2; with expert slices on blackmamba),
# 16 steps (its decode path is the same code as its prefill's)
CASES = [(name, layout) for name in TINY_PRESETS for layout in ("tp=2,ep=1", "tp=1,ep=2", "tp=2,ep=2")]
CASES += [("hf-jamba", "tp=2,ep=2")]  # the loaded checkpoint once, both splits at once (the tiny presets take each alone)
CASES += [("blackmamba-tiny", "tp=2,ep=1,dispatch=alltoall"), ("moe-mamba-tiny", "tp=2,ep=2,dispatch=alltoall"),
          ("jamba-tiny", "tp=2,ep=2,dispatch=alltoall")]


@pytest.mark.parametrize("name,layout", CASES)
def test_matches_single_process(pool, tiny, hf_jamba, name, layout):
    if name == "hf-jamba":
        target, reference = hf_jamba
    else:
        target, reference = name, tiny(name)
    pool.load(target, layout)
    compare_greedy(pool, reference, reference.config.vocab_size, steps=16 if "alltoall" in layout else STEPS)


def test_alltoall_prefill_of_many_tokens(pool, tiny):
    """dispatch=auto: prefill batches of >= ALLTOALL_MIN_TOKENS rows take all-to-all, decode the mask."""
    from mambadeploy.parallel.mesh import ALLTOALL_MIN_TOKENS

    pool.load("jamba-tiny", "tp=2,ep=2,dispatch=auto")
    reference = tiny("jamba-tiny")
    ids = torch.randint(0, 512, (2, ALLTOALL_MIN_TOKENS // 2 + 3), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, _ = reference.prefill(ids)
    got, _ = pool.prefill(ids)
    rel, mean = rel_to_scale(got, expected)
    print(f"prefill of {ids.numel()} tokens: max err / scale {rel:.3e}, mean abs err {mean:.3e}")
    assert rel <= PARALLEL_LOGITS_REL


def test_ranks_given_different_checkpoints_are_refused(pool):
    with pytest.raises(ParallelError, match="different checkpoints") as err:
        pool.load(None, "tp=2", targets=["blackmamba-tiny", "moe-mamba-tiny"])
    print(err.value)
    assert "ranks [0] have preset blackmamba-tiny" in str(err.value)
    assert "ranks [1] have preset moe-mamba-tiny" in str(err.value)
    pool.load("blackmamba-tiny", "tp=2")  # the group survives a refused load
    assert pool.describe()["tp"] == 2


def test_checkpoints_compared_by_content_not_path(pool, tiny, tmp_path):
    """Same shapes, one weight changed (a fine-tune): refused; the same files at another path: accepted."""
    import shutil

    model = tiny("jamba-tiny")
    base = save_model(model, tmp_path / "base")
    shutil.copytree(base, tmp_path / "copy")
    tuned = save_model(model, tmp_path / "tuned")
    from safetensors.torch import load_file, save_file

    weights = load_file(tuned / "model.safetensors")
    weights["final_norm.weight"] = weights["final_norm.weight"] + 1e-3
    save_file(weights, tuned / "model.safetensors", metadata={"format": "mambadeploy"})
    with pytest.raises(ParallelError, match="different checkpoints"):
        pool.load(None, "tp=2", targets=[base, tuned])
    pool.load(None, "tp=2", targets=[base, tmp_path / "copy"])
    logits, _ = pool.prefill(torch.tensor([[1, 2, 3]]))
    with torch.no_grad():
        expected, _ = model.prefill(torch.tensor([[1, 2, 3]]))
    assert rel_to_scale(logits, expected)[0] <= PARALLEL_LOGITS_REL


def test_bad_input_is_one_error_and_the_run_goes_on(pool):
    pool.load("blackmamba-tiny", "tp=2")
    with pytest.raises(ParallelError, match="outside the vocabulary"):
        pool.prefill(torch.tensor([[1, 100000]]))
    logits, _ = pool.prefill(torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 512)


def test_killed_rank_ends_the_others_with_a_clear_error(pool):
    """Last in the module: it breaks the pool."""
    pool.load("jamba-tiny", "tp=2,ep=2")
    logits, state = pool.prefill(torch.tensor([[1, 2, 3]]))
    pool.procs[1].kill()
    start = time.monotonic()
    with pytest.raises(ParallelError) as err:
        pool.step(logits.argmax(-1), state)
    pool.procs[0].join(TIMEOUT_S)
    elapsed = time.monotonic() - start
    message = str(err.value)
    print(f"after {elapsed:.1f} s: {message}")
    assert pool.procs[0].exitcode == WORKER_FAILED, "the surviving rank did not exit"
    assert elapsed < TIMEOUT_S
    assert "rank 1 died" in message and "rank 0 of 2" in message and "another rank died" in message
