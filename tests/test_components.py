"""tests/components.require: a missing expected component skips locally and fails under CI=true."""

from __future__ import annotations

import _pytest.outcomes
import components
import pytest


def test_available_component_passes():
    components.require(True, "x", "never shown")
    assert components.require_module("json", "stdlib").dumps([]) == "[]"


@pytest.mark.parametrize("in_ci, outcome", [(False, _pytest.outcomes.Skipped), (True, _pytest.outcomes.Failed)])
def test_missing_component_skips_locally_and_fails_in_ci(monkeypatch, in_ci, outcome):
    monkeypatch.setattr(components, "IN_CI", in_ci)
    with pytest.raises(outcome, match="no_such_module_here"):
        components.require_module("no_such_module_here", "pip install nothing")
    with pytest.raises(outcome, match="ORT custom-op library"):
        components.require(False, "ORT custom-op library", "compile error")
