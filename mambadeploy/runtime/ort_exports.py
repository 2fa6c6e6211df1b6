"""The export an ORT runner needs for a preset or checkpoint: made once into the cache and reused while the checkpoint's
files, the dtype, the op set and the exporter's own code stay the same; the op mode an export gets by default; and which
of an export's decode states may be updated in place (aliased_states); the hint for a graph ORT has no kernel for
(missing_kernel_hint)."""

from __future__ import annotations

from pathlib import Path

from .. import __version__, settings
from ..errors import InputError
from ..export.manifest import Manifest


def _exporter_hash() -> str:
    """A hash of the code that decides what an export holds (the exporter, the reference model, the op registry): a
    cached export made by other code is never served (the version number alone did not change with every edit)."""
    import hashlib

    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for path in sorted([*(root / "export").glob("*.py"), *(root / "models").glob("*.py"), root / "opset.py"]):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def default_ops(provider: str) -> str:
    """The op mode an export made for this provider gets when the user names none: `custom` for CUDA where our CUDA
    custom-op library can be had (built already, or nvcc here to build it), else `portable` (stock ONNX Runtime)."""
    if provider != "cuda":
        return "portable"
    from ..plugins.ort import build

    return "custom" if build.cuda_library_available() else "portable"


# --------------------------------------------------------------------------- a model that is not exported yet
def export_for(target, dtype="fp32", ops: str | None = None, progress=None) -> Path:
    """The export directory for `target`: itself when it is one; otherwise an export of the preset / checkpoint made
    once into the cache ($MAMBADEPLOY_CACHE, default ~/.cache/mambadeploy) and reused while the checkpoint's files,
    the dtype, the op set and this mambadeploy version stay the same."""
    import hashlib
    import json

    from ..export.manifest import MANIFEST
    from ..models.checkpoint import load_model, parse_dtype
    from ..models.presets import PRESETS
    from ..models.trained import resolve

    target = resolve(target)  # a trained preset is its committed checkpoint directory
    path = Path(str(target))
    if str(target) not in PRESETS and (path / MANIFEST).is_file():
        if ops is not None:
            have = Manifest.read(path).ops
            if have != ops:
                raise InputError(f"{path} holds {have} graphs, not {ops}: export again with --ops {ops}")
        return path
    dtype = parse_dtype(dtype)
    if str(target) in PRESETS:
        identity = {"preset": str(target)}
    else:
        if not path.is_dir():
            from ..models.checkpoint import detect_format

            detect_format(path)  # raises the loaders' own message for a missing / odd path
        files = sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                       for p in path.rglob("*") if p.is_file())
        identity = {"checkpoint": str(path.resolve()), "files": files}
    identity.update(dtype=str(dtype), ops=ops or "portable", mambadeploy=__version__, exporter=_exporter_hash())
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    out = settings.current().cache_dir / "exports" / f"{Path(str(target)).name}-{key}"
    if not (out / MANIFEST).is_file():
        from ..export import require_export_dependencies

        require_export_dependencies()
        from ..export.exporter import export_model

        export_model(load_model(target, dtype=dtype, device="cpu"), out, ops=ops or "portable", force=True,
                     progress=progress)
    return out


# ORT's own ops whose outputs may share an input's buffer, by position (input, output):
# com.microsoft.GroupQueryAttention appends to past_key / past_value in place when present_key / present_value are
# the same buffer (ORT's past_present_share_buffer), writing only the new tokens' slots.
FOREIGN_ALIASES = {("com.microsoft", "GroupQueryAttention"): ((3, 1), (4, 2))}


def aliased_states(decode_path) -> set:
    """State names whose output in this graph may share the input's buffer: a graph input `past.X` read only by a
    registry op whose output aliases it (opset.OUTPUT_ALIASES: DecodeAttention's caches) or by an ORT op that appends
    in place (FOREIGN_ALIASES: GroupQueryAttention), that output being the graph output
    `present.X` (Shape nodes aside). OrtRunner.step binds such a present to the past OrtValue itself, and CUDA-graph
    mode keeps one buffer for it in both ping-pong sets, so a decode step writes one KV slot and reads the filled ones
    instead of copying the whole cache (the op copies once when handed another buffer). The price: the state a step
    consumed shares its KV cache with the state it returned — branch a sequence by stepping copies, not one state
    twice."""
    import onnx

    from ..models.state import PAST, PRESENT
    from ..opset import DOMAIN, OUTPUT_ALIASES, get_op

    graph = onnx.load(str(decode_path), load_external_data=False).graph
    readers: dict = {}
    for node in graph.node:
        for name in node.input:
            if node.op_type != "Shape":  # reads no data: may run before or after the in-place write
                readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    shared = set()
    for node in graph.node:
        if node.domain == DOMAIN and node.op_type in OUTPUT_ALIASES:
            entry = get_op(node.op_type)
            pairs = [(entry.inputs.index(inp), entry.outputs.index(out)) for out, inp in OUTPUT_ALIASES[node.op_type].items()]
        else:
            pairs = FOREIGN_ALIASES.get((node.domain, node.op_type), ())
        for i, o in pairs:
            past, present = node.input[i], node.output[o]
            name = past.removeprefix(PAST)
            if past.startswith(PAST) and present == PRESENT + name and present in outputs and len(readers[past]) == 1:
                shared.add(name)
    return shared


def missing_kernel_hint(message: str, provider: str, manifest) -> str:
    """When ORT refused a graph because a node has no kernel for its dtype on this provider (its messages: "Could not
    find an implementation for Pad(19) node ...", "Provider type for Pad node ... is not set"), a sentence naming the
    op, the dtype and what to do instead; "" otherwise."""
    import re

    m = re.search(r"implementation for (\w+)\(|Provider type for (\w+) node", message)
    if not m:
        return ""
    op = m.group(1) or m.group(2)
    return (f" -- ONNX Runtime ({provider}) has no {op} kernel for this {manifest.dtype} graph; export in another dtype "
            f"(--dtype), with --ops custom (our kernels for the Mamba and MoE ops), or run on the other provider")
