"""Errors a user can act on. Every one names the cause; the CLI prints them without a traceback."""


class MambaDeployError(Exception):
    """Base class: the CLI catches this and prints `error: <message>` with exit code 2."""


class ConfigError(MambaDeployError):
    """A model config that cannot describe a supported model."""


class CheckpointError(MambaDeployError):
    """A checkpoint that cannot be loaded: unknown format, missing/unexpected/mis-shaped keys, corrupt files."""


class InputError(MambaDeployError):
    """Bad runtime input: empty prompt, token id outside the vocabulary, prompt longer than a KV cache."""


class ManifestPathError(MambaDeployError):
    """A path named by an export or engine directory's manifest that resolves outside that directory."""


class MissingDependencyError(MambaDeployError):
    """An optional dependency is not installed; the message names the pip command."""

    def __init__(self, package: str, extra: str | None = None, why: str = ""):
        hint = f"pip install 'mambadeploy[{extra}]'" if extra else f"pip install {package}"
        super().__init__(f"{package} is required{(' for ' + why) if why else ''}; install it with: {hint}")
        self.package = package


def read_json(path, error: type[MambaDeployError] = MambaDeployError):
    """The JSON in `path`; bad JSON raises `error` naming the file and the parser's complaint."""
    import json
    from pathlib import Path

    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc})") from exc


def lazy_import(module: str, package: str | None = None, extra: str | None = None, why: str = ""):
    """Import an optional dependency, or raise MissingDependencyError naming the install command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(package or module.split(".")[0], extra, why) from exc
