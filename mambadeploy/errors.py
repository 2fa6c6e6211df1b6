"""Errors a user can act on. Every one names the cause; the CLI prints them without a traceback."""


class MambaDeployError(Exception):
    """Base class: the CLI catches this and prints `error: <message>` with exit code 2."""


class ConfigError(MambaDeployError):
    """A model config that cannot describe a supported model."""


class CheckpointError(MambaDeployError):
    """A checkpoint that cannot be loaded: unknown format, missing/unexpected/mis-shaped keys, corrupt files."""


class InputError(MambaDeployError):
    """Bad runtime input: empty prompt, token id outside the vocabulary, prompt longer than a KV cache."""


class ParallelError(MambaDeployError):
    """A multi-process run that cannot go on: a layout that does not fit the model, ranks given different checkpoints,
    a rank that died or stopped answering (collective timeout)."""


class RankFailure(ParallelError):
    """A collective failed or timed out: a peer rank died, hung or left. The process group cannot be used again."""


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


def check_fields(cls, data, where: str, error=MambaDeployError):
    """Check `data` (from a JSON file) against the dataclass `cls` before constructing it: every required field present,
    no unknown field, each value of the annotated type (nested dataclasses and lists of them too). Raises `error` naming
    the file, the field, the type expected and the value found; returns `data`."""
    import dataclasses
    import typing

    problems: list[str] = []

    def type_ok(value, hint, path) -> bool:
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if hint is typing.Any:
            return True
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            return any(type_ok(value, a, path) for a in args if a is not type(None)) or (
                value is None and type(None) in args)
        if dataclasses.is_dataclass(hint):
            if isinstance(value, hint):
                return True
            if isinstance(value, dict):
                walk(hint, value, path + ".")
                return True
            return False
        if origin is list:
            if not isinstance(value, list):
                return False
            for i, item in enumerate(value):
                if args and not type_ok(item, args[0], f"{path}[{i}]"):
                    problems.append(f"{path}[{i}]: expected {_type_name(args[0])}, found {item!r}")
            return True
        if origin is dict or hint is dict:
            return isinstance(value, dict)
        if hint is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        if hint is int:
            return isinstance(value, int) and not isinstance(value, bool)
        return isinstance(value, hint) if isinstance(hint, type) else True

    def walk(kind, values, prefix):
        if not isinstance(values, dict):
            problems.append(f"{prefix or 'the top level'}: expected an object, found {values!r}"[:200])
            return
        hints = typing.get_type_hints(kind)
        fields = {f.name: f for f in dataclasses.fields(kind)}
        for name in sorted(set(values) - set(fields)):
            problems.append(f"{prefix}{name}: unknown field")
        for name, f in fields.items():
            path = f"{prefix}{name}"
            if name not in values:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    problems.append(f"{path}: missing (expected {_type_name(hints[name])})")
                continue
            if not type_ok(values[name], hints[name], path):
                problems.append(f"{path}: expected {_type_name(hints[name])}, found {values[name]!r}"[:200])

    walk(cls, data, "")
    if problems:
        more = f"; ... and {len(problems) - 6} more" if len(problems) > 6 else ""
        raise error(f"{where}: " + "; ".join(problems[:6]) + more)
    return data


def _type_name(hint) -> str:
    import typing

    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args and typing.get_origin(hint) is not list:
        return " or ".join(_type_name(a) for a in args) + (" or null" if type(None) in typing.get_args(hint) else "")
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(args[0])}" if args else "a list"
    return getattr(hint, "__name__", str(hint)).replace("Config", " config").replace("LayerSpec", "layer spec")
