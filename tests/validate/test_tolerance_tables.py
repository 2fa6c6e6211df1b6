"""The measured fp32 bounds (validate/tolerances.py) are what the committed measurement says: each op's and each
model-level check's bound is FP32_FACTOR x the worst clean error in benchmarks/results/tolerances_measured_cpu.json
(never below it), the tests' model-level bounds never exceed validate's gate, and a check nobody measured is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mambadeploy.validate import tolerances as tol

MEASURED = json.loads((Path(__file__).resolve().parents[2] / "benchmarks/results/tolerances_measured_cpu.json")
                      .read_text())["summary"]


@pytest.mark.parametrize("kind, table", [("op", tol.OP_FP32_CPU), ("logits", tol.LOGITS_FP32_CPU),
                                         ("state", tol.STATE_FP32_CPU)])
def test_tables_copy_the_measurement(kind, table):
    """Every key was measured; the copied worst is the measured one rounded up to 2 significant digits."""
    for key, worst in table.items():
        measured = MEASURED[kind][key]["float32/cpu"]["worst"]
        print(f"{kind} {key}: measured {measured:.3e}, table {worst:.1e}")
        assert measured <= worst <= measured * 1.1 + 1e-12, f"{kind} {key}: table {worst} vs measured {measured}"


def test_model_bounds_are_ten_times_the_worst_capped_at_the_gate():
    gate = tol.LOGITS_REL[torch.float32]
    for check, worst in tol.LOGITS_FP32_CPU.items():
        assert tol.logits_bound(torch.float32, "cpu", check) == pytest.approx(min(10 * worst, gate))
    assert tol.logits_bound(torch.float32, "cpu", "ort_contrib") < tol.logits_bound(torch.float32, "cpu", "ort_custom")
    assert tol.state_bound(torch.float32, "cpu", "torch_fast") == pytest.approx(10 * tol.STATE_FP32_CPU["torch_fast"])
    assert tol.logits_bound(torch.float32, "cuda", "torch_fast") == gate  # not measured on a GPU: the gate
    assert tol.logits_bound(torch.bfloat16, "cpu", "torch_fast") == tol.LOGITS_REL[torch.bfloat16]
    with pytest.raises(KeyError, match="no measured fp32 bound for check 'nope'"):
        tol.logits_bound(torch.float32, "cpu", "nope")


def test_a_check_fails_just_above_its_bound():
    expected = torch.full((4,), 2.0)
    bound = tol.logits_bound(torch.float32, "cpu", "reference")
    tol.assert_logits_close(expected + 0.9 * bound * 2.0, expected, what="inside", check="reference")
    with pytest.raises(AssertionError, match="exceeds"):
        tol.assert_logits_close(expected + 1.1 * bound * 2.0, expected, what="outside", check="reference")
    with pytest.raises(AssertionError, match="exceeds"):
        tol.assert_state_close(expected + 1.1 * tol.state_bound(torch.float32, "cpu", "torch_fast") * 2.0, expected,
                               check="torch_fast")
