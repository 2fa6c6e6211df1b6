"""`mambadeploy build`: an export directory -> an engine directory (prefill + decode engines).

For each graph: check its custom-op nodes against the registry (unknown op or version -> error naming the fix), compute the
optimization profile from its dynamic dims, fingerprint what the engine would be built from, and skip the build when the
engine directory already holds an intact engine with that fingerprint. Otherwise a child process
(`build_worker`) parses and builds with our plugins registered, streaming progress; TensorRT's log goes to build.log.
Engines and manifest are written atomically.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import MambaDeployError, read_json
from ..opset import DOMAIN, get_op
from ..plugins import trt_lib
from . import engine_dir as ed
from . import fingerprint as fp
from . import profiles as pr

RTX_DEFAULT_CAPABILITIES = ("SM80", "SM86", "SM89", "SM120")  # every GPU family TensorRT-RTX 1.7 runs on
RTX_CAPABILITIES = ("SM75", "SM80", "SM86", "SM89", "SM120", "SM121")  # its ComputeCapability enum
PRECISIONS = ("fp32", "fp16", "bf16")
ONNX_TO_NAME = {1: "fp32", 10: "fp16", 16: "bf16"}


def read_export(export_dir) -> dict:
    export_dir = Path(export_dir)
    path = export_dir / "manifest.json"
    if not path.exists():
        raise MambaDeployError(f"{export_dir} is not an export directory (no manifest.json); make one with: "
                               f"mambadeploy export MODEL --out {export_dir} --ops custom")
    manifest = read_json(path)
    for graph in ed.GRAPHS:
        if not (export_dir / f"{graph}.onnx").exists():
            raise MambaDeployError(f"{export_dir} has no {graph}.onnx; re-export with: mambadeploy export MODEL --out "
                                   f"{export_dir} --ops custom")
    return manifest


def graph_summary(onnx_path) -> dict:
    """{inputs: {name: dims}, custom_ops: [(op, version)], float_type: fp32/fp16/bf16 of the first float input or
    initializer} — read without loading external weights."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    domain_version = {o.domain: o.version for o in model.opset_import}
    inputs = {}
    init_names = {i.name for i in model.graph.initializer}
    float_type = None
    for vi in model.graph.input:
        if vi.name in init_names:
            continue
        dims = tuple(d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else -1)
                     for d in vi.type.tensor_type.shape.dim)
        inputs[vi.name] = dims
    counts = {}
    for init in model.graph.initializer:  # the model dtype = the most common type of the weight matrices
        if init.data_type in ONNX_TO_NAME and len(init.dims) >= 2:
            counts[ONNX_TO_NAME[init.data_type]] = counts.get(ONNX_TO_NAME[init.data_type], 0) + 1
    float_type = max(counts, key=counts.get) if counts else None
    ops = []
    for node in model.graph.node:
        if node.domain == DOMAIN:
            version = domain_version.get(DOMAIN)
            for a in node.attribute:
                if a.name == "plugin_version":
                    version = int(a.s.decode() if a.s else a.i)
            ops.append((node.op_type, version))
    return {"inputs": inputs, "custom_ops": ops, "float_type": float_type}


def check_custom_ops(summary: dict, graph: str) -> list[str]:
    """Every custom node must be a registry op at a version this mambadeploy implements; returns the distinct ops."""
    seen = []
    for op, version in summary["custom_ops"]:
        get_op(op, version)  # raises naming the op, its version and the fix
        if op not in seen:
            seen.append(op)
    return seen


def gpu_description(target: str, capabilities=None) -> str:
    if target == "rtx":
        return "rtx:" + ",".join(capabilities or RTX_DEFAULT_CAPABILITIES)
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"{torch.cuda.get_device_name()} sm_{major}{minor}"
    except ImportError:
        pass
    return "no CUDA GPU visible"


def build_engines(export_dir, out_dir, target: str = "trt", precision: str | None = None, max_batch: int = 8,
                  max_prompt: int = 512, opt_batch: int | None = None, opt_prompt: int | None = None,
                  compute_capabilities=None, force: bool = False, progress=print) -> dict:
    target = trt_lib.check_target(target)
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    export_manifest = read_export(export_dir)
    ops = export_manifest.get("ops", "portable")
    if ops != "custom":
        # The portable graphs hold what TensorRT's parser refuses (ScatterElements with reduction, an ONNX Scan over
        # time) and would be slow where it did not; our plugins replace exactly those pieces.
        raise MambaDeployError(
            f"{export_dir} was exported with --ops {ops}; TensorRT builds need the custom-op graphs, whose scan, conv, "
            f"MoE and decode-step nodes run as our plugins. Export again: mambadeploy export MODEL --ops custom --out DIR")
    if not trt_lib.is_available(target):
        trt_lib.import_trt(target)  # raises MissingDependencyError with the install command
    if target == "trt" and gpu_description(target).startswith("no CUDA"):
        raise MambaDeployError("full TensorRT builds need a CUDA GPU and none is visible; build on the GPU machine, or "
                               "use --target rtx, which builds TensorRT-RTX plans without a GPU")
    trt_info = {"target": target, "version": _trt_version(target)}
    caps = tuple(compute_capabilities or RTX_DEFAULT_CAPABILITIES) if target == "rtx" else None
    unknown = sorted(set(caps or ()) - set(RTX_CAPABILITIES))
    if unknown:
        raise MambaDeployError(f"unknown TensorRT-RTX compute capability {', '.join(unknown)}; choose from "
                               f"{', '.join(RTX_CAPABILITIES)}")
    gpu = gpu_description(target, caps)
    max_seq_len = (export_manifest.get("config") or {}).get("max_seq_len") if _has_attention(export_manifest) else None
    limits = pr.make_limits(max_batch, max_prompt, opt_batch, opt_prompt, max_seq_len)
    plugins = fp.plugin_versions()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        old = ed.read_manifest(out_dir)
    except MambaDeployError:
        old = None
    command = _build_command(export_dir, out_dir, target, precision, max_batch, max_prompt, opt_batch, opt_prompt, caps)
    manifest = {"format": ed.FORMAT, "format_version": ed.FORMAT_VERSION, "target": target, "trt": trt_info,
                "gpu": gpu, "export_dir": str(export_dir.resolve()), "export_manifest": export_manifest,
                "build_command": command, "limits": limits.as_dict(), "engines": {}}
    log_path = out_dir / ed.LOG
    for graph in ed.GRAPHS:
        onnx_path = export_dir / f"{graph}.onnx"
        summary = graph_summary(onnx_path)
        ops = check_custom_ops(summary, graph)
        graph_type = summary["float_type"] or "fp32"
        strongly_typed, precision_flags = _precision_plan(target, precision, graph_type)
        profile = pr.input_profile(summary["inputs"], limits)
        flags = {"precision": precision or graph_type, "strongly_typed": strongly_typed,
                 "precision_flags": precision_flags, "profile": {k: list(map(list, v)) for k, v in profile.items()}}
        built_from = fp.describe(fp.graph_sha(onnx_path), plugins, trt_info, gpu, flags)
        finger = fp.fingerprint(**built_from)
        if not force and ed.cached_engine_ok(out_dir, old, graph, finger):
            progress(f"{graph}: unchanged (fingerprint {finger[:12]}), kept {ed.engine_path(out_dir, graph)}")
            manifest["engines"][graph] = old["engines"][graph]
            continue
        progress(f"{graph}: building with {target} {trt_info['version']} ({', '.join(ops) or 'no custom ops'}; "
                 f"profile {_profile_text(profile)})")
        with open(log_path, "a") as log:
            log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {graph} <- {onnx_path}\n")
        job = {"target": target, "onnx_path": str(onnx_path), "plan_path": str(ed.engine_path(out_dir, graph)),
               "profiles": {k: [list(s) for s in v] for k, v in profile.items()}, "log_path": str(log_path),
               "strongly_typed": strongly_typed, "precision_flags": precision_flags,
               "compute_capabilities": list(caps) if caps else None}
        result = run_worker(job, progress)
        if not result.get("ok"):
            detail = "; ".join(result.get("parse_errors") or []) or result.get("message", "unknown failure")
            raise MambaDeployError(f"building the {graph} engine failed: {detail} (full log: {log_path})")
        path = ed.engine_path(out_dir, graph)
        manifest["engines"][graph] = {"file": path.name, "bytes": path.stat().st_size, "sha256": fp.file_sha256(path),
                                      "fingerprint": finger, "built_from": built_from, "custom_ops": ops,
                                      "layers": result.get("layers", {}), "build_seconds": result.get("build_seconds"),
                                      "io": {k: list(v) for k, v in summary["inputs"].items()}}
        progress(f"{graph}: wrote {path} ({path.stat().st_size} bytes in {result.get('build_seconds')} s)")
    ed.write_manifest(out_dir, manifest)
    return manifest


def run_worker(job: dict, progress=print) -> dict:
    """Run build_worker in a child process; relay its progress lines; return its JSON result (or a failure record if
    the child died, e.g. aborted inside TensorRT)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
        job_path = f.name
    env = trt_lib.plan_env(job["target"])
    package_root = str(Path(__file__).resolve().parents[2])  # so the child imports this very mambadeploy
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen([sys.executable, "-m", "mambadeploy.trt.build_worker", job_path], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr_tail = []
    for line in proc.stderr:
        line = line.rstrip()
        if line.startswith("progress: "):
            progress("  " + line[len("progress: "):])
        elif line:
            stderr_tail = (stderr_tail + [line])[-20:]
    stdout = proc.stdout.read()
    proc.wait()
    Path(job_path).unlink(missing_ok=True)
    last = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    try:
        return json.loads(last)
    except json.JSONDecodeError:
        return {"ok": False, "message": f"the build process died with exit code {proc.returncode}: "
                                        + (" | ".join(stderr_tail[-5:]) or "no output")}


def _precision_plan(target: str, precision: str | None, graph_type: str):
    """(strongly_typed, builder precision flags). A typed graph builds as typed; asking for a lower precision than the
    export's is possible only with full TensorRT's (weakly typed) precision flags — TensorRT-RTX is always strongly typed."""
    if precision is None or precision == graph_type:
        return True, []
    if precision not in PRECISIONS:
        raise MambaDeployError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if target == "rtx" or graph_type != "fp32":
        raise MambaDeployError(
            f"the export is {graph_type} but --{precision} was asked for; "
            + ("TensorRT-RTX builds the graph's own types: " if target == "rtx" else "")
            + f"re-export with --dtype {precision}, or drop --{precision}"
        )
    return False, [{"fp16": "FP16", "bf16": "BF16"}[precision]]


def _has_attention(export_manifest: dict) -> bool:
    cfg = export_manifest.get("config") or {}
    layers = cfg.get("layers") or []
    return any((isinstance(l, dict) and l.get("mixer") == "attention") for l in layers)


def _trt_version(target: str) -> str:
    return trt_lib.version_of(trt_lib.import_trt(target))


def _profile_text(profile: dict) -> str:
    parts = []
    for name, (lo, opt, hi) in profile.items():
        parts.append(f"{name} {'x'.join(map(str, lo))}..{'x'.join(map(str, opt))}..{'x'.join(map(str, hi))}")
    return "; ".join(parts) if parts else "static shapes"


def _build_command(export_dir, out_dir, target, precision, max_batch, max_prompt, opt_batch, opt_prompt, caps) -> str:
    parts = ["mambadeploy", "build", str(export_dir), "--out", str(out_dir), "--target", target,
             "--max-batch", str(max_batch), "--max-prompt", str(max_prompt)]
    if precision:
        parts.append(f"--{precision}")
    if opt_batch:
        parts += ["--opt-batch", str(opt_batch)]
    if opt_prompt:
        parts += ["--opt-prompt", str(opt_prompt)]
    if target == "rtx" and caps and tuple(caps) != RTX_DEFAULT_CAPABILITIES:
        parts += ["--rtx-arch", ",".join(caps)]
    return " ".join(shlex.quote(p) for p in parts)
