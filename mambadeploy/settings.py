"""Process-wide settings read from the environment, in this one place.

Every MAMBADEPLOY_* variable that changes what the runtime or the kernels do is a field here, parsed by
`Settings.from_env`; code below consults `current()` (or is handed a Settings) instead of reading os.environ itself.
Where a constructor takes the same choice as an argument (TorchFastRunner(l2_prefetch=...)), the argument wins and the
setting is only its default.

| variable                | field       | default              | meaning                                          |
|-------------------------|-------------|----------------------|--------------------------------------------------|
| MAMBADEPLOY_PDL         | pdl         | on                   | Hopper programmatic dependent launch (decode)    |
| MAMBADEPLOY_L2_PREFETCH | l2_prefetch | "all"                | torch-fast's L2 prefetch sites: all/none/a list  |
| MAMBADEPLOY_CACHE       | cache_dir   | ~/.cache/mambadeploy | exported graphs and built libraries              |

(Build-time variables of the C++ plugins, MAMBADEPLOY_ORT_INCLUDE / MAMBADEPLOY_CUDA_ARCHS, stay with their builder.)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

# field -> environment variable
ENV_VARS = {"pdl": "MAMBADEPLOY_PDL", "l2_prefetch": "MAMBADEPLOY_L2_PREFETCH", "cache_dir": "MAMBADEPLOY_CACHE"}
_OFF = ("0", "false", "no", "off")
_ON = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    pdl: bool = True
    l2_prefetch: str = "all"
    cache_dir: Path = Path.home() / ".cache" / "mambadeploy"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings named by `environ` (default os.environ); unset variables keep the defaults."""
        env = os.environ if environ is None else environ
        return _parse(tuple(env.get(name) for name in ENV_VARS.values()))


@functools.lru_cache(maxsize=16)
def _parse(values: tuple) -> Settings:
    pdl, l2_prefetch, cache_dir = values
    fields = {}
    if pdl is not None:
        word = pdl.strip().lower()
        if word not in _OFF + _ON:
            raise ConfigError(f"MAMBADEPLOY_PDL={pdl!r}: use 1 or 0")
        fields["pdl"] = word in _ON
    if l2_prefetch is not None:
        fields["l2_prefetch"] = l2_prefetch
    if cache_dir:
        fields["cache_dir"] = Path(cache_dir)
    return Settings(**fields)


def current() -> Settings:
    """The settings of the environment as it is now (parsed once per distinct set of values, so it is cheap enough
    for every kernel launch, and a test or a script that changes a variable is seen)."""
    return Settings.from_env()
