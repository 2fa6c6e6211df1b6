"""Shared fixtures of the plugin tests."""

from __future__ import annotations

import pytest
from components import require

from mambadeploy.errors import MambaDeployError


@pytest.fixture(scope="module")
def library():
    """The CPU build of our ORT custom-op library (built once, cached by source hash); where it cannot be built (no
    network to Debian and no MAMBADEPLOY_ORT_INCLUDE) a skip that says why, a failure under CI=true (components.require).
    test_ort_cuda_ops.py has its own (CUDA)."""
    from mambadeploy.plugins.ort import build

    try:
        return build.build_library()
    except MambaDeployError as exc:
        require(False, "ORT custom-op library (CPU build)", f"could not be built here: {exc}")
