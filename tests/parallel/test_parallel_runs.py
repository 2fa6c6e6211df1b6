"""Two ranks over gloo (worker processes spawned once for the module, models loaded into them in turn) against the
single-process reference: every tiny preset and a transformers-built Jamba under TP=2, EP=2 and TP x EP (both splits
over the same 2 ranks), with both MoE dispatches; 64 greedy decode steps, logits within PARALLEL_LOGITS_REL of the
logit scale, tokens identical, the gathered state equal to the reference state. Then the failure paths: ranks given
different checkpoints, and a killed rank (the survivor exits within the collective timeout, saying why).
The 4-rank grid (tp=2 x ep=2 on 4 processes) is in test_parallel_grid.py."""

from __future__ import annotations

import time

import pytest
import torch
from parallel_models import save_hf_jamba

from mambadeploy.errors import ParallelError
from mambadeploy.models.checkpoint import load_model, save_model
from mambadeploy.models.presets import TINY_PRESETS
from mambadeploy.parallel.spawn import WORKER_FAILED, SpawnedRunner
from mambadeploy.validate.tolerances import PARALLEL_LOGITS_REL, rel_to_scale

TIMEOUT_S = 30.0  # collective timeout of the pool (a killed peer is seen at once by gloo; this bounds a hang)
STEPS = 64


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_hf_jamba(tmp_path_factory.mktemp("hf_jamba_runs"))


@pytest.fixture(scope="module")
def pool():
    runner = SpawnedRunner("blackmamba-tiny", "tp=2", timeout_s=TIMEOUT_S)
    yield runner
    runner.close()


def compare_greedy(runner, reference, vocab: int, steps: int = STEPS, seed: int = 0):
    """Both prefill the same left-padded batch (lengths 9 and 5), then each decodes greedily on its own tokens;
    logits compared every step, tokens required identical. -> (worst relative error, the two final states)."""
    g = torch.Generator().manual_seed(seed)
    ids, lengths = torch.randint(0, vocab, (2, 9), generator=g), torch.tensor([9, 5])
    with torch.no_grad():
        ref_logits, ref_state = reference.prefill(ids, lengths)
    logits, state = runner.prefill(ids, lengths)
    errors = [rel_to_scale(logits, ref_logits)]
    gathered = runner.state_to_torch(state)
    state_err = max((gathered[k].float() - v.float()).abs().max().item() for k, v in ref_state.items())
    assert set(gathered) == set(ref_state) and all(gathered[k].shape == v.shape for k, v in ref_state.items())
    for step in range(steps):
        mine, theirs = logits.argmax(-1), ref_logits.argmax(-1)
        assert torch.equal(mine, theirs), f"greedy tokens differ at step {step}: {mine.tolist()} vs {theirs.tolist()}"
        with torch.no_grad():
            ref_logits, ref_state = reference.step(theirs, ref_state)
        logits, state = runner.step(mine, state)
        errors.append(rel_to_scale(logits, ref_logits))
    worst = max(e[0] for e in errors)
    d = runner.describe()
    print(f"tp={d['tp']} ep={d['ep']} world={d['world']}: logits max err / scale {worst:.3e}, mean abs err "
          f"{max(e[1] for e in errors):.3e}, prefill state max abs err {state_err:.3e} "
          f"(bound {PARALLEL_LOGITS_REL:.0e})")
    assert worst <= PARALLEL_LOGITS_REL
    assert state_err <= PARALLEL_LOGITS_REL * 10  # states are O(1): the same reassociation bound, unscaled
    return worst


# TP, EP, TP x EP (tp=2,ep=2 on 2 ranks: experts split over the same ranks as the mixers) for every model; the
# all-to-all dispatch on the presets (sigmoid top-1, softmax top-1, softmax top-2; with expert slices on blackmamba),
# 16 steps (its decode path is the same code as its prefill's)
CASES = [(name, layout) for name in TINY_PRESETS + ("hf-jamba",) for layout in ("tp=2,ep=1", "tp=1,ep=2", "tp=2,ep=2")]
CASES += [("blackmamba-tiny", "tp=2,ep=1,dispatch=alltoall"), ("moe-mamba-tiny", "tp=2,ep=2,dispatch=alltoall"),
          ("jamba-tiny", "tp=2,ep=2,dispatch=alltoall")]


@pytest.mark.parametrize("name,layout", CASES)
def test_matches_single_process(pool, tiny, hf_dir, name, layout):
    if name == "hf-jamba":
        target, reference = hf_dir, load_model(hf_dir)
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
