"""One ONNX graph -> one serialized TensorRT / TensorRT-RTX plan, in a child process.

Run as `python -m mambadeploy.trt.build_worker JOB.json`. Why a child process: TensorRT-RTX must find its unversioned
library name at process start (plugins/trt_lib.py) and a fault inside TensorRT aborts the whole process — the parent (the
CLI, pytest) survives and reports it. Protocol: progress lines on stderr (`progress: ...`), TensorRT's log into the job's
log file, and one JSON result object as the last line of stdout: {"ok", "plan_bytes", "parse_errors", "layers",
"plugins", "message"}. The plan is written to a temporary name and renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def _log_to(trt, path: str):
    class FileLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.f = open(path, "a", buffering=1)

        def log(self, severity, msg):
            self.f.write(f"[{time.strftime('%H:%M:%S')}] [{str(severity).split('.')[-1]}] {msg}\n")

    return FileLogger()


SHOWN_DEPTH = 2  # TensorRT nests phases ~6 deep; the top two say where the build is without flooding the terminal


def _progress_monitor(trt):
    class Progress(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.depth = 0

        def phase_start(self, phase_name, parent_phase, num_steps):
            if self.depth < SHOWN_DEPTH:
                print(f"progress: {'  ' * self.depth}{phase_name} ...", file=sys.stderr, flush=True)
            self.depth += 1

        def step_complete(self, phase_name, step):
            return True  # never cancel

        def phase_finish(self, phase_name):
            self.depth = max(0, self.depth - 1)

    return Progress()


def prepared_graph(onnx_path: str) -> tuple[bytes, list[str]]:
    """The graph with our nodes' omitted optional inputs made explicit (plugins/trt_graph.py), weights left on disk."""
    import onnx

    from mambadeploy.plugins.trt_graph import fill_optional_inputs

    model = onnx.load(onnx_path, load_external_data=False)
    filled = fill_optional_inputs(model)
    return model.SerializeToString(), filled


def _dtype_counts(network) -> dict:
    counts = {}
    for i in range(network.num_layers):
        t = str(network.get_layer(i).type).split(".")[-1]
        counts[t] = counts.get(t, 0) + 1
    return counts


def build(job: dict) -> dict:
    from mambadeploy.plugins import trt_lib, trt_v3

    target = job["target"]
    trt = trt_lib.import_trt(target)
    trt_lib.require_plugin_safe_process(target)
    logger = _log_to(trt, job["log_path"])
    plugins = trt_v3.register_plugins(trt)
    print(f"progress: registered plugins {', '.join(plugins)}", file=sys.stderr, flush=True)

    builder = trt.Builder(logger)
    flags = 0
    if target == "trt" and job.get("strongly_typed", True):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    print(f"progress: parsing {job['onnx_path']}", file=sys.stderr, flush=True)
    model_bytes, filled = prepared_graph(job["onnx_path"])
    for line in filled:
        print(f"progress: prepared: {line}", file=sys.stderr, flush=True)
    ok = parser.parse(model_bytes, job["onnx_path"])  # the path lets the parser find external weight files
    errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
    result = {"ok": False, "parse_errors": errors, "plugins": plugins, "plan_bytes": 0, "layers": {},
              "filled_inputs": filled}
    if not ok:
        result["message"] = "the ONNX parser refused the graph"
        return result
    result["layers"] = _dtype_counts(network)

    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in job["profiles"].items():
        profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
    config.add_optimization_profile(profile)
    if target == "trt" and not job.get("strongly_typed", True):
        for flag in job.get("precision_flags", []):
            config.set_flag(getattr(trt.BuilderFlag, flag))
    if target == "rtx" and job.get("compute_capabilities"):
        config.num_compute_capabilities = len(job["compute_capabilities"])
        for i, cap in enumerate(job["compute_capabilities"]):
            config.set_compute_capability(getattr(trt.ComputeCapability, cap), i)
    # plugins whose outputs alias inputs (DecodeAttention's KV caches: opset.OUTPUT_ALIASES) need this preview
    # feature (TensorRT >= 10.3; TensorRT-RTX 1.7 has it); without it they get separate buffers and copy the cache
    aliased = getattr(getattr(trt, "PreviewFeature", None), "ALIASED_PLUGIN_IO_10_03", None)
    if aliased is not None:
        config.set_preview_feature(aliased, True)
    result["aliased_plugin_io"] = aliased is not None
    if hasattr(config, "progress_monitor"):
        config.progress_monitor = _progress_monitor(trt)

    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    result["build_seconds"] = round(time.perf_counter() - t0, 3)
    if plan is None:
        result["message"] = "TensorRT could not build the network (see the build log)"
        return result
    out = Path(job["plan_path"])
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(memoryview(plan))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    result.update(ok=True, plan_bytes=out.stat().st_size, message="built")
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(argv[0]).read_text())
    try:
        result = build(job)
    except Exception as exc:  # reported to the parent as data; the parent raises the user-facing error
        result = {"ok": False, "message": f"{type(exc).__name__}: {exc}", "parse_errors": [], "plan_bytes": 0}
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
