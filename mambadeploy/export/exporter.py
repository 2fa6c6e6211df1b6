"""`export_model(model, out_dir, ...)`: trace prefill and decode, rewrite the custom nodes for the op mode, check every
graph, write manifest.json — all into a temporary directory renamed into place at the end, so a failed export leaves
nothing behind and an existing export is replaced only when asked (force) and only once the new one is complete.

Memory: the weights are held once, by the model. The traced graphs reference the parameters (no copies) and the writer
streams them tensor by tensor. Big models (weights over EXTERNAL_DATA_BYTES) keep the weights in external data that the
decode graph shares with the prefill graph (its initializers point into prefill.onnx.data), so the weights are written
and stored once.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import shutil
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnx
import torch

from .. import __version__, opset
from ..dtypes import FLOAT_NAMES, manifest_name
from ..errors import MambaDeployError
from ..interrupts import cleanup_on_interrupt
from ..models.model import MambaMoELM
from ..models.state import state_specs
from . import checks, graphs
from .descriptions import DEFAULT_OPSET, MIN_OPSET, OPS_MODES, description_for
from .manifest import MANIFEST, GraphEntry, Manifest, config_sha256, sha256_file

EXTERNAL_DATA_BYTES = 1 << 30  # protobuf caps a file at 2 GB; above 1 GiB of weights keep them outside the graph


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def export_model(model: MambaMoELM, out_dir, ops: str = "portable", opset_version: int = DEFAULT_OPSET,
                 max_batch: int | None = None, force: bool = False, progress=None,
                 prefill_state: bool = False) -> Manifest:
    """Export `model` (any dtype, on the CPU) to `out_dir`; returns the manifest written there. prefill_state: also a
    third graph, prefill_state.onnx, whose prompt continues an incoming state (chunked prefill of long prompts)."""
    say = progress or (lambda msg: None)
    config = model.config
    desc = description_for(config)
    desc.check_config(config)
    if ops not in OPS_MODES:
        raise MambaDeployError(f"unknown --ops {ops!r}; choose one of {', '.join(OPS_MODES)}")
    if opset_version < MIN_OPSET:
        raise MambaDeployError(f"opset {opset_version} is too old: the graphs need opset >= {MIN_OPSET} (Gelu)")
    if model.device.type != "cpu":
        raise MambaDeployError(f"export traces a CPU model; got one on {model.device}")
    if max_batch is not None:
        if max_batch < 1:
            raise MambaDeployError(f"max batch must be >= 1, got {max_batch}")
        desc = type(desc)(**{**desc.__dict__, "max_batch": max_batch})
    if prefill_state:
        desc = type(desc)(**{**desc.__dict__, "graphs": (*desc.graphs, "prefill_state")})
    out = Path(out_dir)
    check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_partials(out, say)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the export directory gets the usual permissions
    try:
        with cleanup_on_interrupt(tmp):
            manifest = _export_into(model, tmp, ops, opset_version, desc, say)
            _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"wrote {out}")
    return manifest


def sweep_stale_partials(out: Path, say) -> None:
    """Remove `.OUT.partial-PID-*` directories of this export left by a process that no longer runs (a kill -9), and
    older `.OUT.partial-*` ones (no PID in the name) untouched for an hour."""
    for p in out.parent.glob(f".{out.name}.partial-*"):
        rest = p.name[len(f".{out.name}.partial-"):]
        pid = rest.split("-", 1)[0]
        if pid.isdigit() and "-" in rest:
            try:
                os.kill(int(pid), 0)
                continue  # still running: another export of the same directory
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        elif time.time() - p.stat().st_mtime < 3600:
            continue
        shutil.rmtree(p, ignore_errors=True)
        say(f"removed {p}, left by an interrupted export")


def check_target(out: Path, force: bool) -> None:
    """An empty directory is fine; an export directory is replaced with --force; anything else is never replaced."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    is_export = out.is_dir() and (out / MANIFEST).is_file()
    if not is_export:
        raise MambaDeployError(f"refusing to write into {out}: it exists and is not an export directory (no {MANIFEST}); "
                               "--force replaces only earlier exports, never other files: choose another --out")
    if not force:
        raise MambaDeployError(f"{out} already holds an export; pass --force to replace it")


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


@contextlib.contextmanager
def _quiet():
    """The torch exporter prints its progress and warns about unrelated things (torchvision); keep the CLI readable."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
            warnings.simplefilter("ignore")
            yield buf
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export_into(model, tmp: Path, ops: str, opset_version: int, desc, say) -> Manifest:
    config = model.config
    dtype = FLOAT_NAMES.get(model.dtype, (None, None))[1]
    if dtype is None:
        raise MambaDeployError(f"cannot export a {model.dtype} model; use fp32, fp16 or bf16")
    external = weight_bytes(model) > EXTERNAL_DATA_BYTES
    max_length = desc.max_length(config)
    shared: dict = {}  # initializer name -> (data_ptr, shape, dtype) written with prefill
    entries = {}
    t0 = time.perf_counter()

    def stamp(msg):
        say(f"[{time.perf_counter() - t0:5.1f}s] {msg}")

    def write(program, graph, reused):
        path = tmp / f"{graph}.onnx"
        program.save(str(path), external_data=True)
        del program
        gc.collect()
        _finish_graph(path, ops, external, reused, tmp / "prefill.onnx", say)
        entries[graph] = _graph_entry(path, checks.check_graph(path))
        stamp(f"wrote and checked {path.name}")

    pending = None  # a big model's prefill weights are written while decode is traced (disk-bound vs CPU-bound)
    with ThreadPoolExecutor(max_workers=1) as pool:
        for graph in desc.graphs:
            stamp(f"tracing {graph} ({ops} ops, opset {opset_version})")
            with _quiet():
                program = graphs.trace(model, graph, ops, opset_version, desc, max_length)
            reused = set()
            if external and graph == "prefill":
                shared.update(_initializer_identities(program))
            elif external:
                reused = _drop_shared_initializers(program, shared)
            if pending is not None:
                pending.result()  # decode's shared weights point into prefill.onnx.data: it must be complete
                pending = None
            stamp(f"writing {graph}.onnx" + (" + external data" if external else ""))
            if external and graph == "prefill":
                pending = pool.submit(write, program, graph, reused)
            else:
                write(program, graph, reused)
            del program
        if pending is not None:
            pending.result()
    specs = state_specs(config, model.dtype)
    manifest = Manifest(
        family=config.family, config=config.to_dict(), dtype=dtype, ops=ops,
        opset=max(opset_version, 27) if ops == "standard" else opset_version,  # standard.STANDARD_OPSET
        state=[{"name": s.name, "shape": list(s.shape), "dtype": manifest_name(s.dtype)} for s in specs],
        graphs=entries,
        limits={"max_batch": desc.max_batch, "max_length": max_length},
        checkpoint={"source": getattr(model, "source", None), "config_sha256": config_sha256(config.to_dict()),
                    "weight_bytes": weight_bytes(model)},
        exporter={"method": "torch.onnx.export(dynamo=True)", "torch": torch.__version__, "onnx": onnx.__version__,
                  "onnxscript": _version("onnxscript")},
        mambadeploy_version=__version__,
        domains=_domains(entries, tmp),
        contrib=_contrib_summary(config) if ops == "contrib" else {},
    )
    manifest.write(tmp)
    return manifest


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def _contrib_summary(config) -> dict:
    from .contrib import what_fits

    return what_fits(config)


def _domains(entries, tmp: Path) -> dict:
    found = {}
    for e in entries.values():
        for o in onnx.load(str(tmp / e.file), load_external_data=False).opset_import:
            if o.domain not in ("", "ai.onnx"):
                found[o.domain] = o.version
    return found


# --------------------------------------------------------------------------- one graph on disk
def _finish_graph(path: Path, ops: str, external: bool, reused: set, prefill_path: Path, say) -> None:
    """Rewrite the saved graph: expand custom nodes (portable / contrib), point shared weights at the prefill data,
    or pull small models' weights inline."""
    from .portable import expand_custom_nodes

    data = path.with_name(path.name + ".data")
    proto = onnx.load(str(path), load_external_data=not external)
    if external and reused:  # first: the expansions below read these weights' types
        donor = {t.name: t for t in onnx.load(str(prefill_path), load_external_data=False).graph.initializer}
        proto.graph.initializer.extend(donor[name] for name in sorted(reused))
    if ops != "custom":
        n = expand_custom_nodes(proto, piece="standard" if ops == "standard" else "portable")
        if n:
            say(f"        expanded {n} {opset.DOMAIN} nodes into standard ops")
    if ops == "standard":
        from .standard import to_standard_opset

        to_standard_opset(proto)
    proto.producer_name, proto.producer_version = "mambadeploy", __version__
    if not external and data.exists():
        data.unlink()
    onnx.save(proto, str(path))
    if external and data.exists() and not any(
            _location(t) == data.name for t in proto.graph.initializer):
        data.unlink()


def _location(tensor) -> str | None:
    for kv in tensor.external_data:
        if kv.key == "location":
            return kv.value
    return None


def _initializer_identities(program) -> dict:
    """name -> identity of the torch storage behind each parameter initializer (None for exporter-made constants)."""
    out = {}
    for name, value in program.model.graph.initializers.items():
        raw = getattr(value.const_value, "raw", None)
        if isinstance(raw, torch.Tensor):
            out[name] = (raw.data_ptr(), tuple(raw.shape), raw.dtype)
    return out


def _drop_shared_initializers(program, shared: dict) -> set:
    """Remove from this graph the initializers that are the very same parameters the prefill graph wrote; the caller
    re-adds them as references into prefill.onnx.data."""
    mine = _initializer_identities(program)
    reused = {name for name, ident in mine.items() if shared.get(name) == ident}
    for name in reused:
        program.model.graph.initializers.pop(name)
    return reused


def _graph_entry(path: Path, proto: onnx.ModelProto) -> GraphEntry:
    files = sorted({loc for t in proto.graph.initializer if (loc := _location(t))})
    return GraphEntry(
        file=path.name, sha256=sha256_file(path), bytes=path.stat().st_size,
        inputs=checks.tensor_specs(proto.graph.input), outputs=checks.tensor_specs(proto.graph.output),
        external_data=[{"file": f, "bytes": (path.parent / f).stat().st_size} for f in files],
    )
