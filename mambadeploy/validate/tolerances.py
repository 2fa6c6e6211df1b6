"""Tolerances are data: every comparison in tests and in `validate` takes its bounds from here.

Errors on logits are measured relative to the logit scale: max|a - b| / max(max|b|, 1). How each number was chosen:
- fp32, same math (torch eager vs torch eager step, ORT CPU fp32): reassociation only; validate's gate LOGITS_REL is
  1e-4, the bound issue 3/4 ask for, kept with margin for long generations. The tests bound each model-level check on
  the CPU by 10x its measured worst (LOGITS_FP32_CPU / STATE_FP32_CPU below: 7e-7 to 9e-6 of the logit scale; 2.9e-5
  over 128 decode steps).
- op parity (kernels vs _ref): fp32 on the CPU from measured clean errors, per op (OP_FP32_CPU below); fp16/bf16, and
  fp32 on a GPU until measured there, mamba_ssm's own test tolerances per dtype (rtol, atol): fp32 (3e-4, 1e-3),
  fp16 (5e-3, 1e-2), bf16 (1e-2, 5e-2).
- low-precision whole models: logits drift, so they are judged by teacher-forced top-1 agreement (>= 99 %) and a looser
  relative-to-scale bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float


# fp32 on the CPU (the interpreter, ORT CPU, torch): each bound is FP32_FACTOR x the worst clean max abs error measured
# by scripts/measure_tolerances.py over every fp32 comparison of that op in the suite (committed measurement:
# benchmarks/results/tolerances_measured_cpu.json). 10x leaves room for other shapes / BLAS builds while staying below
# the smallest planted bug (tanh-GELU for exact GELU: 1.2e-4 abs at op level; scripts/mutation_audit.py). FP32_FLOOR:
# an op measured bit-exact here still gets one fp32 rounding's worth of room at unit scale.
FP32_FACTOR = 10.0
FP32_FLOOR = 1e-6
# op -> worst clean max abs error / max(max|expected|, 1) (fp32 comparisons, CPU); the bound is FP32_FACTOR x this,
# times the compared output's own scale (outputs of the scan reach |y| ~ 1e3 in the tests: an absolute bound would not
# carry from one input scale to another)
OP_FP32_CPU = {
    "aot_interpreted": 4.6e-7,  # 19 comparisons, bound 4.6e-6
    "causal_conv1d": 1.9e-7,  # 14 comparisons, bound 1.9e-6
    "decode_attention": 2.4e-7,  # 8 comparisons, bound 2.4e-6
    "decode_consistency": 1.8e-6,  # 16 comparisons, bound 1.8e-5
    "gemv": 3.2e-7,  # 30 comparisons, bound 3.2e-6
    "moe": 2.9e-7,  # 82 comparisons, bound 2.9e-6
    "moe_oracle": 6.9e-7,  # 25 comparisons, bound 6.9e-6
    "onnx_portable": 2.3e-7,  # 66 comparisons, bound 2.3e-6
    "ort_custom_ops": 1.7e-6,  # 55 comparisons, bound 1.7e-5
    "ort_decode_ops": 4.5e-7,  # 168 comparisons, bound 4.5e-6
    "rms_norm": 1.8e-7,  # 34 comparisons, bound 1.8e-6
    "selective_scan": 6.8e-7,  # 56 comparisons, bound 6.8e-6
    "sparse_gemv": 2.0e-7,  # 18 comparisons, bound 2.0e-6
    "state_update": 5.7e-7,  # 24 comparisons, bound 5.7e-6
}
# Model-level fp32 on the CPU, per check (which pair of implementations a test compares): worst clean max abs error /
# max(max|expected|, 1) over every comparison of that check in the suite's model-level tests, measured by
# scripts/measure_tolerances.py (benchmarks/results/tolerances_measured_cpu.json, summary "logits" / "state", with each
# check's five worst tests). The tests' bound (logits_bound / state_bound) is FP32_FACTOR x this, capped at
# LOGITS_REL[fp32]; validate's user-facing gate stays LOGITS_REL. Recurrent states (conv / SSM state, KV cache, each
# relative to its own scale) are measured and bounded apart from the logits. Checks:
#   reference        the model against itself (step vs full forward over 260 steps, sparse branches) and against the
#                    per-token oracle (models/oracle.py)
#   transformers     transformers' Mamba / Jamba (test_hf_parity)
#   torch_fast       TorchFastRunner on the Triton interpreter vs the reference, dense and SCAP-sparse
#   chunked_prefill  prefill in chunks (torch-fast, the reference's own, ORT prefill_state.onnx) and <= 16 steps after
#   long_decode      128-step decodes: the ORT runner (every --ops), ORT GroupQueryAttention, the length-aware kernel.
#                    Reassociation drifts over the steps: the transformers-built Jamba reaches 2.9e-5, so this bound
#                    is the cap (3.4x its worst), as before
#   ort_*            the ORT CPU runner per --ops (portable / custom / standard / contrib): prefill and <= 12 steps,
#                    incl. fresh exports against the oracle
LOGITS_FP32_CPU = {  # worst measured; the test bound is 10x (in brackets)
    "reference": 2.7e-6,  # 16 comparisons [2.7e-5]; jamba-tiny step vs full forward, 260 steps
    "transformers": 3.3e-6,  # 5 [3.3e-5]; transformers-built Jamba logits
    "torch_fast": 1.3e-6,  # 15 [1.3e-5]; jamba-tiny prefill
    "chunked_prefill": 9.1e-6,  # 28 [9.1e-5]; ORT runner chunked prefill, decode step 12 after it
    "long_decode": 2.9e-5,  # 2050 [1e-4, the cap]; transformers-built Jamba, ORT portable, decode step 55 of 128
    "ort_portable": 4.2e-6,  # 41 [4.2e-5]; jamba-tiny fresh export vs the oracle, step 2
    "ort_custom": 4.2e-6,  # 6 [4.2e-5]; transformers-built Jamba prefill
    "ort_standard": 3.6e-6,  # 5 [3.6e-5]; transformers-built Jamba prefill
    "ort_contrib": 7.0e-7,  # 26 [7.0e-6]; sigmoid top-1, step 10
}
STATE_FP32_CPU = {  # worst measured, each state tensor relative to its own scale; the test bound is 10x
    "torch_fast": 1.2e-6,  # 17 comparisons [1.2e-5]; jamba-tiny conv state after prefill
    "chunked_prefill": 1.5e-6,  # 58 [1.5e-5]; transformers-built Jamba SSM state after 5-token chunks
    "long_decode": 1.1e-5,  # 105 [1e-4, the cap]; transformers-built Jamba conv state after 128 ORT custom steps
    "ort_portable": 1.6e-6,  # 68 [1.6e-5]; jamba-tiny SSM state after a 1x33 prefill
}


# op-level parity (kernel / plugin vs _ref), per dtype of the inputs
OP = {
    torch.float32: Tolerance(3e-4, 1e-3),
    torch.float16: Tolerance(5e-3, 1e-2),
    torch.bfloat16: Tolerance(1e-2, 5e-2),
}

# whole-model logits, max abs error relative to the logit scale, per compute dtype
LOGITS_REL = {
    torch.float32: 1e-4,
    torch.float16: 5e-2,
    torch.bfloat16: 1e-1,
}

# tensor / expert parallel (parallel/) against the single-process model, fp32 logits over 64 decode steps: the same
# math with the sums of the row-split projections and of the MoE cut into per-rank partials and all-reduced
# (reassociation only; seen <= 1.4e-6 of the logit scale on the tiny presets, gloo on the CPU); 1e-5 is issue 20's bound.
PARALLEL_LOGITS_REL = 1e-5

# an fp8 (e4m3, unscaled) KV cache against the fp32 reference, max abs logit error relative to the logit scale: a guard
# against a broken fp8 path, not a quality claim. e4m3 keeps 3 mantissa bits (relative rounding 2^-4). Measured on the
# random tiny Jambas (tests/runtime/test_long_context.py, CPU): prefill 0.19 (jamba-tiny) / 0.013 (transformers-built),
# 16 teacher-forced decode steps 0.089 / 0.055, against 1.7e-3 / 4.6e-3 for a bf16 cache. Random weights make logits
# sensitive; real checkpoints must be measured (benchmarks/long_context.py reports the error on the GPU run).
KV_FP8_LOGITS_REL = 0.25

# teacher-forced top-1 agreement with the fp32 reference, per compute dtype
TOP1_AGREEMENT = {
    torch.float32: 1.0,
    torch.float16: 0.99,
    torch.bfloat16: 0.99,
}

# Teacher-forced next-byte top-1 agreement with fp32 of the trained testbed (models/trained) on held-out text, the whole
# sequence at once (every position of 8 x 128 bytes, incl. the low-confidence ones greedy decoding rarely visits).
# Measured (CPU, torch 2.13): fp16 99.8-99.9 %, bf16 98.1 / 98.9 / 99.5 % (blackmamba / moe-mamba / jamba), so bf16 is
# *not* >= 99 % on every model here; validate's own greedy prompts reach 100 % in both dtypes. Bounds: fp16 the table
# above; bf16 one point below the lowest measured (bf16 keeps 8 bits of mantissa: a trained model's near-ties still flip).
TRAINED_HELDOUT_TOP1 = {
    torch.float16: 0.99,
    torch.bfloat16: 0.97,
}


# scripts/measure_tolerances.py sets this to a list: every comparison then appends its measured error (no assertion
# changes). None in normal runs.
MEASUREMENTS: list | None = None


def _record(kind, op, dtype, device, what, err) -> None:
    if MEASUREMENTS is not None:
        MEASUREMENTS.append({"kind": kind, "op": op, "dtype": str(dtype).removeprefix("torch."), "device": device,
                             "what": what, "max_err": err})


def _scale(expected: torch.Tensor) -> float:
    return max(expected.float().abs().max().item(), 1.0) if expected.numel() else 1.0


def rel_to_scale(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max abs error / logit scale, mean abs error) — scale = max(max|expected|, 1)."""
    diff = (actual.float() - expected.float()).abs()
    scale = max(expected.float().abs().max().item(), 1.0)
    return diff.max().item() / scale, diff.mean().item()


def op_tolerance(dtype: torch.dtype, op: str | None = None, device: str = "cpu") -> Tolerance:
    """The bound of one op-level comparison: measured per op for fp32 on the CPU, else the per-dtype OP table."""
    if dtype == torch.float32 and op is not None and device == "cpu" and MEASUREMENTS is None:
        if op not in OP_FP32_CPU:
            raise KeyError(f"no measured fp32 bound for op {op!r}: run scripts/measure_tolerances.py and add it")
        return Tolerance(0.0, max(FP32_FACTOR * OP_FP32_CPU[op], FP32_FLOOR))  # x the output's scale, see below
    return OP[dtype]


def assert_close_op(actual, expected, dtype=None, what="output", op: str | None = None):
    """Print max/mean error, then assert within the op's tolerance (op: a key of OP_FP32_CPU; None: the per-dtype OP)."""
    dtype = dtype or actual.dtype
    tol = op_tolerance(dtype, op, actual.device.type)
    diff = (actual.float() - expected.float()).abs()
    scale = _scale(expected)
    _record("op", op, dtype, actual.device.type, what, diff.max().item() / scale if diff.numel() else 0.0)
    if tol.rtol == 0.0:  # a measured fp32 bound: relative to the output's scale, max(max|expected|, 1), like logits
        tol = Tolerance(0.0, tol.atol * scale)
    print(f"{what}: max abs err {diff.max().item():.3e}, mean abs err {diff.mean().item():.3e} (rtol {tol.rtol}, atol {tol.atol})")
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol.rtol, atol=tol.atol)


def op_checker(op: str):
    """assert_close_op bound to one op's measured fp32 bound: `check_op = op_checker("selective_scan")` in a test module."""

    def check(actual, expected, dtype=None, what="output"):
        assert_close_op(actual, expected, dtype, what, op=op)

    return check


def _model_bound(table: dict, check: str | None) -> float:
    """FP32_FACTOR x the check's measured worst (None: the loosest check), floored and capped at LOGITS_REL."""
    if check is not None and check not in table:
        raise KeyError(f"no measured fp32 bound for check {check!r}: run scripts/measure_tolerances.py and add it")
    worst = table[check] if check is not None else max(table.values())
    return min(max(FP32_FACTOR * worst, FP32_FLOOR), LOGITS_REL[torch.float32])


def logits_bound(dtype: torch.dtype, device: str = "cpu", check: str | None = None) -> float:
    """The tests' bound on logits (relative to the logit scale): measured per check for fp32 on the CPU, else
    LOGITS_REL. check: a key of LOGITS_FP32_CPU (None: the loosest of them)."""
    if dtype == torch.float32 and device == "cpu" and MEASUREMENTS is None:
        return _model_bound(LOGITS_FP32_CPU, check)
    return LOGITS_REL[dtype]


def state_bound(dtype: torch.dtype, device: str = "cpu", check: str | None = None) -> float:
    """The tests' bound on a recurrent-state / KV tensor, relative to its own scale: STATE_FP32_CPU as above."""
    if dtype == torch.float32 and device == "cpu" and MEASUREMENTS is None:
        return _model_bound(STATE_FP32_CPU, check)
    return LOGITS_REL[dtype]


def _assert_model_close(kind, bound_of, actual, expected, dtype, what, check):
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    rel, mean = rel_to_scale(actual, expected)
    device = actual.device.type
    bound = bound_of(dtype, device, check)
    _record(kind, check or "(no check)", dtype, device, what, rel)
    print(f"{what}: max err / scale {rel:.3e}, mean abs err {mean:.3e} (bound {bound:.1e}, {check or 'any'} check)")
    assert rel <= bound, f"{what}: max error {rel:.3e} of the scale exceeds {bound:.1e} ({check or 'any'} check)"


def assert_logits_close(actual, expected, dtype=torch.float32, what="logits", check: str | None = None):
    """Max abs error relative to the logit scale within logits_bound (check: a key of LOGITS_FP32_CPU)."""
    _assert_model_close("logits", logits_bound, actual, expected, dtype, what, check)


def assert_state_close(actual, expected, dtype=torch.float32, what="state", check: str | None = None):
    """A state tensor (conv / SSM state, KV cache) relative to its own scale within state_bound."""
    _assert_model_close("state", state_bound, actual, expected, dtype, what, check)


# per-layer drift (validate --per-layer): max abs error of a hidden-state or state tensor relative to that tensor's own
# scale, per compute dtype. Diagnostic only (the logits bounds above decide pass/fail): it names the first layer whose
# tensors leave this bound. fp32: same bound as the fp32 logits (reassociation only, ~1e-6 seen between runtimes).
# fp16/bf16: one rounding of a unit-scale value is 2^-11 / 2^-8 (5e-4 / 4e-3), which grows through the layers of the
# residual stream; the bounds sit near the logits bounds so a clean low-precision run stays inside them on the tiny
# presets while a perturbed weight (errors of order 1) stands out.
PER_LAYER_REL = {
    torch.float32: 1e-4,
    torch.float16: 5e-2,
    torch.bfloat16: 1e-1,
}


# Low-precision backends (fp16/bf16) in `validate`: the fp32 reference model itself, run in that dtype by torch eager
# (the "precision baseline"), already flips near-tie MoE routes and argmaxes; no backend in that dtype can avoid that.
# Measured on the tiny presets (CPU, 4 prompts x 64 tokens): torch bf16 vs the fp32 reference reaches max err/scale
# 0.17-0.44 and top-1 agreement 95.7-99.2 %; fp16 6e-3-8e-3 and 98.8-100 %. So a low-precision backend passes when it is
# within the fixed bounds above, or, where the baseline itself misses a fixed bound, as close to fp32 as the baseline
# is with this margin: error up to BASELINE_ERR_FACTOR x the baseline's, top-1 agreement down to the baseline's minus
# BASELINE_TOP1_SLACK.
# fp32 backends are judged by the fixed bounds alone (a perturbed weight moves fp32 logits by >= 1e-2 of the scale,
# two decades above LOGITS_REL; in low precision only gross faults stand out, which is why CI validates in fp32).
# A baseline worse than these caps does not loosen anything: then the model itself does not hold up in that dtype
# (the random blackmamba-1.5b preset on the H100: torch bf16 against fp32 reaches 38 % top-1 agreement; on the CPU a
# 6-layer model of the same width has its first MoE layer's output 0.7 of its scale off in bf16, 1e-3 in fp16: near-tie
# top-1 routes flip), every backend of that dtype fails the fixed bounds, and the report says the baseline misses them
# too. The caps sit beyond the tiny presets' baselines (max err 0.44, top-1 95.7 %).
BASELINE_ERR_FACTOR = 2.0
BASELINE_TOP1_SLACK = 0.02
BASELINE_MAX_ERR = 0.5
BASELINE_MIN_TOP1 = 0.9


def logits_gate(dtype: torch.dtype, baseline: dict | None = None) -> dict:
    """The bounds a backend of `dtype` is judged by: {"logits_max_rel", "top1_agreement"} plus where they came from.
    baseline: the precision baseline's {"max_rel", "top1_agreement"} (low precision only)."""
    gate = {"logits_max_rel": LOGITS_REL[dtype], "top1_agreement": TOP1_AGREEMENT[dtype], "source": "fixed"}
    usable = baseline is not None and baseline["max_rel"] <= BASELINE_MAX_ERR and \
        baseline["top1_agreement"] >= BASELINE_MIN_TOP1
    if baseline is not None and dtype != torch.float32 and not usable:
        gate["source"] = "fixed (the precision baseline misses it too: the model does not hold up in this dtype)"
    if usable and dtype != torch.float32:
        # loosen a bound only where the baseline itself misses it: then the dtype, not the backend, is the limit
        err, top1 = gate["logits_max_rel"], gate["top1_agreement"]
        if baseline["max_rel"] > err:
            err = BASELINE_ERR_FACTOR * baseline["max_rel"]
        if baseline["top1_agreement"] < top1:
            top1 = baseline["top1_agreement"] - BASELINE_TOP1_SLACK
        if (err, top1) != (gate["logits_max_rel"], gate["top1_agreement"]):
            gate = {"logits_max_rel": err, "top1_agreement": top1, "source": "precision baseline"}
    return gate
