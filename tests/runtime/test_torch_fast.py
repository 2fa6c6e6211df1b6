"""torch-fast (Triton kernels, CUDA-graph decode) vs the fp32 reference on the tiny presets.

On CPU the kernels run in Triton's interpreter, so CI checks short generations; on a GPU (marked gpu) the full checks
run: fp32 greedy tokens identical for 256 tokens, bf16 teacher-forced top-1 agreement >= 99 %."""

from __future__ import annotations

import pytest
import torch
from stepping import follow_greedy

from mambadeploy.errors import ConfigError, InputError
from mambadeploy.runtime.generate import generate
from mambadeploy.runtime.torch_eager import TorchEagerRunner
from mambadeploy.runtime.torch_fast import L2_PREFETCH_SITES, FastState, TorchFastRunner
from mambadeploy.validate.tolerances import (
    BASELINE_ERR_FACTOR,
    BASELINE_TOP1_SLACK,
    assert_logits_close,
    assert_state_close,
    logits_gate,
    rel_to_scale,
)

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
PROMPTS = [[5, 17, 3, 99, 42, 7, 250], [11, 2, 301]]  # different lengths: left padding


def _model(tiny, name, dtype="fp32"):
    model = tiny(name, dtype)
    return model if DEVICE == "cpu" else _on_gpu(model, name, dtype)


_GPU_MODELS: dict = {}


def _on_gpu(model, name, dtype):
    import copy

    key = (name, dtype)
    if key not in _GPU_MODELS:
        _GPU_MODELS[key] = copy.deepcopy(model).to("cuda")
    return _GPU_MODELS[key]


def test_greedy_tokens_match_the_reference(tiny, preset):
    """fp32: the same greedy tokens as the reference (short on CPU: the interpreter is slow)."""
    model = _model(tiny, preset)
    n = 256 if GPU else 12
    fast = generate(TorchFastRunner(model), PROMPTS, n)
    ref = generate(TorchEagerRunner(model), PROMPTS, n)
    assert fast.tokens == ref.tokens


def test_cublas_projections_and_wide_batches_match_the_reference(tiny):
    """triton_gemv=False (cuBLAS projections, the separate conv-update kernel, the LM head through F.linear into the
    logits buffer), and a batch wider than TRITON_GEMV_MAX_BATCH on the default runner: the reference's greedy tokens."""
    from mambadeploy.runtime.torch_fast import TRITON_GEMV_MAX_BATCH

    model = _model(tiny, "blackmamba-tiny")
    n = 64 if GPU else 4
    ref = generate(TorchEagerRunner(model), PROMPTS, n)
    assert generate(TorchFastRunner(model, triton_gemv=False), PROMPTS, n).tokens == ref.tokens
    wide = [PROMPTS[i % 2] for i in range(TRITON_GEMV_MAX_BATCH + 1)]
    assert generate(TorchFastRunner(model), wide, n).tokens == generate(TorchEagerRunner(model), wide, n).tokens


def test_prefill_and_step_logits_and_state_match(tiny, preset):
    model = _model(tiny, preset)
    fast, ref = TorchFastRunner(model), TorchEagerRunner(model)
    ids = torch.tensor([[0, 0, 5, 17, 3], [8, 9, 10, 11, 12]])
    lengths = torch.tensor([3, 5])
    logits, state = fast.prefill(ids, lengths)
    logits_ref, state_ref = ref.prefill(ids, lengths)
    assert_logits_close(logits, logits_ref, torch.float32, what="prefill logits", check="torch_fast")
    for name, value in state_ref.items():
        assert_state_close(state.tensors[name], value, what=f"state {name}", check="torch_fast")
    token = torch.tensor([4, 6])
    logits2, state2 = fast.step(token, state)
    logits2_ref, _ = ref.step(token, state_ref)
    assert state2 is state  # advanced in place
    assert_logits_close(logits2, logits2_ref, torch.float32, what="step logits", check="torch_fast")


def test_decode_from_a_reference_state(tiny):
    """A state dict from another runner is copied in, and decoding continues as the reference does."""
    model = _model(tiny, "blackmamba-tiny")
    fast, ref = TorchFastRunner(model), TorchEagerRunner(model)
    _, state_ref = ref.prefill(torch.tensor([[1, 2, 3, 4]]))
    logits, state = fast.step(torch.tensor([5]), state_ref)
    logits_ref, _ = ref.step(torch.tensor([5]), state_ref)
    assert isinstance(state, FastState)
    assert_logits_close(logits, logits_ref, torch.float32, check="torch_fast")


def test_wrong_batch_is_refused(tiny):
    fast = TorchFastRunner(_model(tiny, "blackmamba-tiny"))
    _, state = fast.prefill(torch.tensor([[1, 2, 3]]))
    with pytest.raises(InputError, match="batch"):
        fast.step(torch.tensor([1, 2]), state)
    with pytest.raises(InputError, match="vocabulary"):
        fast.step(torch.tensor([10_000]), state)


def _teacher_forced(ref, runner, prompt, steps):
    """Follow the fp32 reference's own greedy tokens; (top-1 agreement, max logit error / scale) of `runner`."""
    logits_ref, state_ref = ref.prefill(prompt)
    logits, state = runner.prefill(prompt)
    agree, worst = 0, 0.0
    for i in range(steps):
        agree += int((logits.argmax(-1) == logits_ref.argmax(-1)).all())
        worst = max(worst, rel_to_scale(logits, logits_ref)[0])
        if i == steps - 1:
            break
        token = logits_ref.argmax(-1)
        logits_ref, state_ref = ref.step(token, state_ref)
        logits, state = runner.step(token, state)
    return agree / steps, worst


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_teacher_forced_top1(tiny, preset, dtype):
    """bf16/fp16 torch-fast follows the fp32 reference's greedy sequence for 256 tokens. The bar is TOP1_AGREEMENT
    (99 %), loosened by tolerances.logits_gate only where the reference itself, run in that dtype (the precision
    baseline), misses it: the tiny random presets have many near-tie logits (bf16 eager: ~94 % on two of them), and
    where even the baseline falls apart torch-fast is held to the baseline's own numbers."""
    ref = TorchEagerRunner(_model(tiny, preset))
    prompt = torch.tensor([PROMPTS[0]])
    top1, err = _teacher_forced(ref, TorchFastRunner(_model(tiny, preset, dtype)), prompt, 256)
    base_top1, base_err = _teacher_forced(ref, TorchEagerRunner(_model(tiny, preset, dtype)), prompt, 256)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float16
    gate = logits_gate(torch_dtype, {"max_rel": base_err, "top1_agreement": base_top1})
    print(f"{preset} {dtype}: torch-fast top-1 {top1:.4f}, max err/scale {err:.3f}; torch eager {dtype} "
          f"{base_top1:.4f}, {base_err:.3f}; gate {gate}")
    if gate["source"].startswith("fixed ("):
        # the reference itself does not hold up in this dtype (a flipped route moves whole logit rows, seen on
        # blackmamba-tiny bf16): then torch-fast must do as well as the reference in the same dtype
        assert top1 >= base_top1 - BASELINE_TOP1_SLACK
        assert err <= BASELINE_ERR_FACTOR * base_err
    else:
        assert top1 >= gate["top1_agreement"]
        assert err <= gate["logits_max_rel"]


@needs_gpu
@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager_steps(tiny, preset):
    model = _model(tiny, preset, "bf16")
    graphed, eager = TorchFastRunner(model), TorchFastRunner(model, use_cuda_graph=False)
    prompt = torch.tensor(PROMPTS[:1])
    sa, sb = follow_greedy(graphed, eager, prompt, 20,
                           lambda lb, la: torch.testing.assert_close(la, lb, rtol=0, atol=0))
    assert sa.graph is not None and sb.graph is None


@needs_gpu
@pytest.mark.gpu
def test_graphed_prefill_equals_eager_prefill(tiny, preset):
    model = _model(tiny, preset, "bf16")
    eager, graphed = TorchFastRunner(model), TorchFastRunner(model, prefill_graphs=True)
    for prompt in (torch.tensor(PROMPTS[:1]), torch.tensor([PROMPTS[0][::-1]])):  # the second replays the graph
        (la, sa), (lb, sb) = eager.prefill(prompt), graphed.prefill(prompt)
        torch.testing.assert_close(lb, la, rtol=0, atol=0)
        for name, value in sa.tensors.items():
            torch.testing.assert_close(sb.tensors[name], value, rtol=0, atol=0, msg=name)
    assert len(graphed._prefill_cache) == 1


def test_describe_reports_the_launch_mode(tiny, monkeypatch):
    """describe() says whether the decode kernels use programmatic dependent launch: never on CPU; on an sm_90+ GPU
    unless MAMBADEPLOY_PDL=0."""
    runner = TorchFastRunner(_model(tiny, "blackmamba-tiny"))
    info = runner.describe()
    assert info["backend"] == "torch-fast" and info["triton_gemv"] is True
    if not torch.cuda.is_available():
        assert info["pdl"] is False
    monkeypatch.setenv("MAMBADEPLOY_PDL", "0")
    assert runner.describe()["pdl"] is False


def test_l2_prefetch_sites_are_parsed_and_checked(tiny, monkeypatch):
    """The L2 prefetch sites: all by default, none when switched off, unknown names refused with the known ones."""
    model = _model(tiny, "blackmamba-tiny")
    assert TorchFastRunner(model).describe()["l2_prefetch"] == ",".join(L2_PREFETCH_SITES)
    assert TorchFastRunner(model, l2_prefetch="none").l2_prefetch == frozenset()
    monkeypatch.setenv("MAMBADEPLOY_L2_PREFETCH", "0")
    assert TorchFastRunner(model).describe()["l2_prefetch"] == "none"
    # the constructor argument wins over the environment's setting, both ways
    assert TorchFastRunner(model, l2_prefetch="xproj").l2_prefetch == frozenset({"xproj"})
    monkeypatch.setenv("MAMBADEPLOY_L2_PREFETCH", "all")
    assert TorchFastRunner(model, l2_prefetch="none").describe()["l2_prefetch"] == "none"
    with pytest.raises(ConfigError, match="xproj"):
        TorchFastRunner(model, l2_prefetch="xproj,bogus")
