"""Expected components of the test environment: skipped locally when absent, a failure under CI.

A missing optional dependency, or a C++ library that fails to build, used to turn whole modules of parity tests into
skips, so a compile error in CI read as a green run. `.ci/run` exports CI=true and installs every component listed in
pyproject's `dev` extra plus TensorRT-RTX and nvidia-pytriton: there, a component that is missing or fails to build is
a test failure. GPU-only tests (marker `gpu`, a CUDA device) are not expected in CI and keep their plain skips.
"""

from __future__ import annotations

import importlib
import os

import pytest

IN_CI = os.environ.get("CI") == "true"  # read once, here: the one place the tests ask whether they run in CI
DEV_INSTALL = "pip install -e '.[dev]'"  # every Python component the suite expects


def require(available: bool, component: str, reason: str) -> None:
    """Skip (locally) or fail (CI=true) when an expected `component` is not available; `reason` says how to get it."""
    if available:
        return
    message = f"{component} is expected but unavailable: {reason}"
    if IN_CI:
        pytest.fail(f"CI=true: {message}", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def require_module(name: str, install: str):
    """importorskip that fails under CI: the imported module, or a skip/failure naming the install command."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        require(False, name, f"{exc} ({install})")
