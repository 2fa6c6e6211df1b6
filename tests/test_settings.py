"""mambadeploy/settings.py: every MAMBADEPLOY_* variable the runtime and the kernels honour is parsed there and only
there, and a constructor argument wins over it (tests/runtime/test_torch_fast.py checks that for l2_prefetch)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mambadeploy import settings
from mambadeploy.errors import ConfigError
from mambadeploy.settings import ENV_VARS, Settings

PACKAGE = Path(settings.__file__).resolve().parent
# Build-time knobs of the C++ plugin builder (its include path, CUDA archs, library cache) stay with the builder.
BUILD_TIME = {PACKAGE / "plugins" / "ort" / "build.py"}
ENV_READ = re.compile(r"(os\.environ|os\.getenv|environ\.get)[^\n]*MAMBADEPLOY_")


def test_unset_variables_keep_the_defaults():
    assert Settings.from_env({}) == Settings()
    assert Settings().pdl is True and Settings().l2_prefetch == "all"


def test_each_variable_sets_its_field():
    env = {"MAMBADEPLOY_PDL": "0", "MAMBADEPLOY_L2_PREFETCH": "none", "MAMBADEPLOY_CACHE": "/tmp/md-cache"}
    got = Settings.from_env(env)
    assert got == Settings(pdl=False, l2_prefetch="none", cache_dir=Path("/tmp/md-cache"))
    assert set(ENV_VARS.values()) == set(env)  # the table covers every variable tested here


def test_a_bad_value_is_a_clear_error():
    with pytest.raises(ConfigError, match="MAMBADEPLOY_PDL='maybe'"):
        Settings.from_env({"MAMBADEPLOY_PDL": "maybe"})


def test_current_follows_the_environment(monkeypatch):
    monkeypatch.setenv("MAMBADEPLOY_PDL", "0")
    assert settings.current().pdl is False
    monkeypatch.setenv("MAMBADEPLOY_PDL", "1")
    assert settings.current().pdl is True
    with pytest.raises(AttributeError):  # frozen: nobody changes the settings behind the environment's back
        settings.current().pdl = False


def test_no_module_reads_a_mambadeploy_variable_itself():
    """The environment is read in settings.py alone (apart from the plugin builder's build-time knobs)."""
    readers = [str(p.relative_to(PACKAGE)) for p in sorted(PACKAGE.rglob("*.py"))
               if p.name != "settings.py" and p not in BUILD_TIME and ENV_READ.search(p.read_text())]
    print("modules reading MAMBADEPLOY_* themselves:", readers)
    assert readers == []
