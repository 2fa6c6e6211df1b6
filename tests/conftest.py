"""Shared fixtures: the tiny presets, built once per session (tests must not modify them)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from mambadeploy.models.checkpoint import load_model
from mambadeploy.models.presets import TINY_PRESETS

_CACHE: dict = {}


def pytest_configure(config):
    """Every test session gets a fresh export cache ($MAMBADEPLOY_CACHE): an export left by earlier code or an earlier
    run is never served to a test. What is keyed by its own content is linked in from the user's cache: the ORT headers
    (by version) and the custom-op libraries (by a hash of their sources, headers and flags). An explicitly set
    MAMBADEPLOY_CACHE (the device runs' prebuilt libraries) is kept."""
    if "MAMBADEPLOY_CACHE" in os.environ:
        return
    fresh = Path(tempfile.mkdtemp(prefix="mambadeploy-test-cache-"))
    home = Path.home() / ".cache" / "mambadeploy"
    for kept in [*home.glob("ort-headers-*"), *home.glob("ort-ops-*")]:
        (fresh / kept.name).symlink_to(kept, target_is_directory=True)
    os.environ["MAMBADEPLOY_CACHE"] = str(fresh)

# The tiny models' ops are far too small to gain from intra-op threads, and on a shared 2-core runner OpenMP threads
# spinning against other processes made decode steps ~10x slower (measured here): run torch single-threaded in tests.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny():
    """tiny(name, dtype="fp32") -> the preset model in eval mode, cached for the session (read-only)."""

    def get(name: str, dtype: str = "fp32"):
        key = (name, dtype)
        if key not in _CACHE:
            _CACHE[key] = load_model(name, dtype=dtype)
        return _CACHE[key]

    return get


@pytest.fixture(params=TINY_PRESETS)
def preset(request) -> str:
    """Each tiny preset name in turn."""
    return request.param


@pytest.fixture
def no_grad():
    """Inference tests: `pytestmark = pytest.mark.usefixtures("no_grad")` (not autouse: other tests may need grad)."""
    with torch.no_grad():
        yield


@pytest.fixture(scope="session")
def tokenizer_json(tmp_path_factory):
    """A tiny WordLevel tokenizer: word w{i} <-> id i for the 512 ids of the tiny presets."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(511)} | {"[UNK]": 511}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)
