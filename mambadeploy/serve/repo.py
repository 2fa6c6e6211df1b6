"""Write a Triton Inference Server model repository (`mambadeploy serve-repo`).

REPO/<name>/config.pbtxt + 1/model.py: the Python-backend model, decoupled (one response per token), running our
Runner under in-flight batching (serve/triton_model.py). Its parameters say what to load (target, backend, dtype,
device, max batch) and where this mambadeploy lives (python_path), so the server's Python stub imports the same code.

REPO/<name>_decode/ (from an export or engine directory, or with state_config=True): the exported decode graph
(ONNX Runtime backend) or decode engine (TensorRT backend) under Triton's sequence batcher with implicit state: one
state entry per conv / ssm / KV tensor of the manifest, zero initial state, so a client feeds a sequence one token per
request (prompt tokens first: from a zero state that is the prefill) and Triton carries the state between requests.
The ONNX copy gets START / READY / CORRID inputs (unused by the graph: ONNX Runtime refuses feeds a graph does not
declare) and its `pos` state as (batch, 1) (Triton state dims are per sequence and cannot be empty). The engine's
config has no control inputs and keeps `pos` as the engine has it: a built engine cannot gain inputs (unverified: no
TensorRT here).

Every config is built as the ModelConfig protobuf message that tritonclient ships and written in its text format, so
it parses by construction; `read_config` parses one back.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import InputError, lazy_import

# name -> (Triton data type, dims) of the Python model's inputs (all optional; the model checks what it got)
INPUTS = {
    "input_ids": ("TYPE_INT64", [-1]),
    "text_input": ("TYPE_STRING", [1]),
    "max_tokens": ("TYPE_INT32", [1]),
    "temperature": ("TYPE_FP32", [1]),
    "top_k": ("TYPE_INT32", [1]),
    "top_p": ("TYPE_FP32", [1]),
    "seed": ("TYPE_INT64", [1]),
    "stop_ids": ("TYPE_INT64", [-1]),
    "stream": ("TYPE_BOOL", [1]),  # false: one response with every token (what the generate endpoint needs)
}
# one response per token: its id, its index in the sequence, and its latency (time to first token for index 0, the
# inter-token gap after); text_output when the repository has a tokenizer. With stream false: one response, all tokens.
OUTPUTS = {
    "output_ids": ("TYPE_INT64", [-1]),
    "index": ("TYPE_INT32", [-1]),
    "latency_ms": ("TYPE_FP32", [-1]),
    "text_output": ("TYPE_STRING", [1]),
}
TOKENIZER_FILE = "tokenizer.json"
TEXT_FIELDS = ("text_input", "text_output")
CONTROLS = (("START", "CONTROL_SEQUENCE_START"), ("READY", "CONTROL_SEQUENCE_READY"))
CORRID = "CORRID"
_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64"}

MODEL_PY = '''"""Triton Python-backend entry point written by `mambadeploy serve-repo`: the work is in
mambadeploy/serve/triton_model.py (found through the config's python_path parameter)."""
import json
import sys


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters", {})
        path = params.get("python_path", {}).get("string_value")
        if path and path not in sys.path:
            sys.path.insert(0, path)
        from mambadeploy.serve.triton_model import MambaServeModel

        self.impl = MambaServeModel(args)

    def execute(self, requests):
        return self.impl.execute(requests)

    def finalize(self):
        self.impl.finalize()
'''


def _pb():
    return lazy_import("tritonclient.grpc.model_config_pb2", "tritonclient[grpc]", extra="serve",
                       why="Triton model configurations (serve-repo)")


def _text(config) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(config)


def read_config(path):
    """Parse a config.pbtxt into tritonclient's ModelConfig message (raises on anything the schema refuses)."""
    from google.protobuf import text_format

    return text_format.Parse(Path(path).read_text(), _pb().ModelConfig())


def python_model_config(name: str, parameters: dict, text: bool = False):
    """text: declare text_input / text_output (a tokenizer in the repository). Without them Triton itself refuses a
    string input, which matters: under numpy 2 the wheel's stub dies on receiving one."""
    mc = _pb()
    cfg = mc.ModelConfig(name=name, backend="python", max_batch_size=0)  # batching is ours, not Triton's
    cfg.model_transaction_policy.decoupled = True
    for n, (dtype, dims) in INPUTS.items():
        if text or n not in TEXT_FIELDS:
            cfg.input.add(name=n, data_type=mc.DataType.Value(dtype), dims=dims, optional=True)
    for n, (dtype, dims) in OUTPUTS.items():
        if text or n not in TEXT_FIELDS:
            cfg.output.add(name=n, data_type=mc.DataType.Value(dtype), dims=dims)
    # KIND_CPU: one instance that places the model itself (--device); Triton must not start one per GPU
    cfg.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    for key, value in parameters.items():
        cfg.parameters[key].string_value = str(value)
    return cfg


def write_repo(target, out, name: str = "mamba", backend: str = "torch-fast", dtype: str = "bf16",
               device: str = "cuda", max_batch: int = 64, tokenizer=None, threads: int | None = None,
               state_config: bool | None = None, response_interval_ms: float = 0.0) -> dict:
    """Write the repository; returns {model name: model directory}. state_config: also write the implicit-state
    model (default: when target is an export or engine directory). response_interval_ms: a stream gets at most one
    response per interval (its tokens gather in between; 0: one as soon as the sender is free, see
    triton_model._send_loop)."""
    import mambadeploy

    from ..runtime.factory import BACKENDS, directory_kind

    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; backends: {', '.join(BACKENDS)}")
    if max_batch < 1:
        raise InputError(f"--max-batch must be >= 1, got {max_batch}")
    if not 0 <= response_interval_ms <= 10_000:
        raise InputError(f"--response-interval-ms must be in [0, 10000], got {response_interval_ms}")
    out = Path(out)
    kind = directory_kind(target)
    resolved = str(Path(target).resolve()) if kind is not None or Path(str(target)).is_dir() else str(target)
    params = {"target": resolved, "backend": backend, "dtype": dtype, "device": device, "max_batch": max_batch,
              "python_path": str(Path(mambadeploy.__file__).resolve().parent.parent)}
    if threads:
        params["threads"] = threads
    if response_interval_ms:
        params["response_interval_ms"] = response_interval_ms
    model_dir = out / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        import numpy as np

        if int(np.__version__.split(".")[0]) >= 2:
            raise InputError(f"--tokenizer: Triton's Python stub (nvidia-pytriton 0.7) passes strings through numpy "
                             f"1.x and crashes on them under numpy {np.__version__}; pip install 'numpy<2' (the serve "
                             "extra does), or serve token ids without --tokenizer")
        shutil.copyfile(tokenizer, model_dir / TOKENIZER_FILE)
        params["tokenizer"] = TOKENIZER_FILE
    (model_dir / "config.pbtxt").write_text(_text(python_model_config(name, params, text=tokenizer is not None)))
    (model_dir / "1" / "model.py").write_text(MODEL_PY)
    written = {name: model_dir}
    if state_config is None:
        state_config = kind is not None
    if state_config:
        source = Path(target) if kind is not None else _export(target, dtype)
        written[f"{name}_decode"] = write_state_model(source, out, f"{name}_decode", max_batch)
    return written


def _export(target, dtype):
    from ..runtime.ort_runner import export_for

    return export_for(target, dtype=dtype, ops="portable")


def write_state_model(source, out, name: str, max_batch: int) -> Path:
    """The implicit-state model of an export directory (onnxruntime backend) or engine directory (tensorrt)."""
    from ..runtime.factory import directory_kind

    source = Path(source)
    model_dir = Path(out) / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    if directory_kind(source) == "engines":
        from ..trt.engine_dir import engine_path, read_manifest

        manifest = read_manifest(source)
        export = manifest.get("export_manifest") or {}
        state = [(s["name"], s["shape"], s["dtype"]) for s in export.get("state", [])]
        vocab = (export.get("config") or {}).get("vocab_size")
        if not state or not vocab:
            raise InputError(f"{source}: its manifest has no export_manifest state / config; rebuild the engines")
        _link(engine_path(source, "decode"), model_dir / "1" / "model.plan")
        cfg = state_model_config(name, "tensorrt", state, vocab, max_batch, controls=False)
    else:
        from ..export.manifest import Manifest

        manifest = Manifest.read(source)
        manifest.check_files(source, hash_graphs=False)
        state = [(s.name, s.shape, s.dtype) for s in manifest.state]
        _onnx_with_controls(source, manifest, model_dir / "1")
        cfg = state_model_config(name, "onnxruntime", state, manifest.model_config.vocab_size, max_batch)
        if manifest.ops == "custom":
            from ..plugins.ort.build import build_library

            library = build_library()
            shutil.copyfile(library, model_dir / "1" / library.name)
            cfg.model_operations.op_library_filename.append(str((model_dir / "1" / library.name).resolve()))
    (model_dir / "config.pbtxt").write_text(_text(cfg))
    return model_dir


def state_model_config(name, backend, state, vocab_size, max_batch, controls: bool = True):
    """state: [(name, shape with "batch" first, numpy-style dtype)] in manifest order."""
    mc = _pb()
    cfg = mc.ModelConfig(name=name, backend=backend, max_batch_size=max_batch)
    cfg.input.add(name="input_ids", data_type=mc.TYPE_INT64, dims=[1])
    cfg.output.add(name="logits", data_type=mc.TYPE_FP32, dims=[vocab_size])
    seq = cfg.sequence_batching
    seq.max_sequence_idle_microseconds = 60_000_000
    if controls:
        for control_name, kind in CONTROLS:
            c = seq.control_input.add(name=control_name).control.add(kind=mc.ModelSequenceBatching.Control.Kind.Value(kind))
            c.fp32_false_true.extend([0.0, 1.0])
        seq.control_input.add(name=CORRID).control.add(
            kind=mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_CORRID, data_type=mc.TYPE_UINT64)
    for state_name, shape, dtype in state:
        dims = [int(d) for d in shape[1:]] or [1]  # per sequence; `pos` (batch,) becomes (batch, 1)
        suffix = ".2d" if not shape[1:] and backend == "onnxruntime" else ""  # _onnx_with_controls reshaped it
        entry = seq.state.add(input_name=f"past.{state_name}{suffix}", output_name=f"present.{state_name}{suffix}",
                              data_type=mc.DataType.Value(_TYPES[dtype]), dims=dims)
        init = entry.initial_state.add(name=f"zero.{state_name}", data_type=entry.data_type, dims=dims)
        init.zero_data = True
    cfg.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_GPU)
    return cfg


TWIN_MODEL_PY = '''"""Stand-in written by mambadeploy (serve/repo.py write_loadable_twin): it lets the bundled server (Python backend
only) load an implicit-state configuration to check it; the Python backend does not carry implicit state."""
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        message = "implicit state is carried only by the onnxruntime / tensorrt backends of a full Triton install"
        return [pb_utils.InferenceResponse(error=pb_utils.TritonError(message)) for _ in requests]
'''


def write_loadable_twin(model_dir, out) -> Path:
    """A copy of an implicit-state model on the Python backend (all the bundled server has), for checking that Triton
    accepts its sequence batcher and state entries: out/<name>_twin/config.pbtxt + 1/model.py."""
    mc = _pb()
    twin = read_config(Path(model_dir) / "config.pbtxt")
    twin.name = f"{twin.name}_twin"
    twin.backend = "python"
    twin.platform = ""
    twin.ClearField("model_operations")
    del twin.instance_group[:]
    twin.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    directory = Path(out) / twin.name
    (directory / "1").mkdir(parents=True, exist_ok=True)
    (directory / "config.pbtxt").write_text(_text(twin))
    (directory / "1" / "model.py").write_text(TWIN_MODEL_PY)
    return directory


def _link(src: Path, dst: Path) -> None:
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    dst.symlink_to(Path(src).resolve())


def _onnx_with_controls(source: Path, manifest, version_dir: Path) -> None:
    """decode.onnx as 1/model.onnx plus the control inputs, with `pos` reshaped to (batch, 1); external data linked."""
    import onnx
    from onnx import TensorProto, helper

    graph_entry = manifest.graphs["decode"]
    proto = onnx.load(str(source / graph_entry.file), load_external_data=False)
    g = proto.graph
    for control_name, _ in CONTROLS:
        g.input.append(helper.make_tensor_value_info(control_name, TensorProto.FLOAT, ["batch", 1]))
    g.input.append(helper.make_tensor_value_info(CORRID, TensorProto.UINT64, ["batch", 1]))
    names = {i.name for i in g.input}
    if "past.pos" in names:  # (batch,) int64 <-> (batch, 1) at the graph's edges
        axes = helper.make_tensor("pos_axes", TensorProto.INT64, [1], [1])
        g.initializer.append(axes)
        for i in g.input:
            if i.name == "past.pos":
                i.CopyFrom(helper.make_tensor_value_info("past.pos.2d", TensorProto.INT64, ["batch", 1]))
        g.node.insert(0, helper.make_node("Squeeze", ["past.pos.2d", "pos_axes"], ["past.pos"]))
        for o in g.output:
            if o.name == "present.pos":
                o.CopyFrom(helper.make_tensor_value_info("present.pos.2d", TensorProto.INT64, ["batch", 1]))
        g.node.append(helper.make_node("Unsqueeze", ["present.pos", "pos_axes"], ["present.pos.2d"]))
    onnx.save(proto, str(version_dir / "model.onnx"))
    for ext in graph_entry.external_data:  # the graph names its data file relative to itself
        _link(source / ext["file"], version_dir / ext["file"])
