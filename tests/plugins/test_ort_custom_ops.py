"""(c) The ORT custom-op library (our C++ sources, built against ORT's C API headers from Debian's libonnxruntime-dev)
loaded with SessionOptions.register_custom_ops_library: parity with the `_ref` on CPU, awkward shapes, omitted optional
inputs; a whole `--ops custom` export through the ORT runner against the torch model; the CUDA build of the library
compiles (nvcc) and loads here too (its CUDA kernels run in test_ort_cuda_ops.py, GPU only). Builds the libraries on
first use (seconds; cached by source hash)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from components import DEV_INSTALL, require, require_module

from mambadeploy.errors import MambaDeployError
from mambadeploy.opset import REGISTRY as opset_registry_dict
from mambadeploy.opset import get_op
from mambadeploy.validate.tolerances import op_checker

check_op = op_checker("ort_custom_ops")  # fp32 on the CPU: this op's measured bound

ort = require_module("onnxruntime", DEV_INSTALL)

from op_graphs import single_op_model  # noqa: E402  (tests/plugins is on sys.path)


def _session(model, library):
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _feeds(model, dims, seed):
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        shape = [dims[d.dim_param] if d.dim_param else d.dim_value for d in vi.type.tensor_type.shape.dim]
        if vi.type.tensor_type.elem_type == 7:
            feeds[vi.name] = rng.integers(0, dims["experts"], size=shape).astype(np.int64)
        else:
            feeds[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _inits(model):
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


@pytest.mark.parametrize("batch,L", [(1, 1), (3, 7), (1, 33), (3, 154)])
@pytest.mark.parametrize("omit", [(), ("D", "delta_bias", "initial_state")])
def test_selective_scan_cpu(library, batch, L, omit):
    model = single_op_model("SelectiveScan", dim=6, n=16, omit=omit, attrs={"delta_softplus": 1})
    feeds = _feeds(model, {"batch": batch, "length": L}, seed=L)
    y, h = _session(model, library).run(None, feeds)
    t = {k: torch.from_numpy(v) for k, v in {**_inits(model), **feeds}.items()}
    ry, rh = get_op("SelectiveScan").resolve("reference")(
        t["u"], t["delta"], t["A"], t["B"], t["C"], t.get("D"), t["z"], t.get("delta_bias"), True,
        t.get("initial_state"))
    check_op(torch.from_numpy(y), ry, torch.float32, "y")
    check_op(torch.from_numpy(h), rh, torch.float32, "last_state")


@pytest.mark.parametrize("batch,L", [(1, 1), (3, 7), (3, 154)])
@pytest.mark.parametrize("omit", [(), ("bias", "initial_state")])
@pytest.mark.parametrize("activation", [0, 1])
def test_causal_conv1d_cpu(library, batch, L, omit, activation):
    model = single_op_model("CausalConv1d", dim=33, k=4, omit=omit, attrs={"activation": activation})
    feeds = _feeds(model, {"batch": batch, "length": L}, seed=L)
    y, s = _session(model, library).run(None, feeds)
    t = {k: torch.from_numpy(v) for k, v in {**_inits(model), **feeds}.items()}
    ry, rs = get_op("CausalConv1d").resolve("reference")(t["x"], t["weight"], t.get("bias"), t.get("initial_state"),
                                                         "silu" if activation else None)
    check_op(torch.from_numpy(y), ry, torch.float32, "y")
    check_op(torch.from_numpy(s), rs, torch.float32, "final_state")


@pytest.mark.parametrize("tokens,top_k,activation", [(1, 1, 0), (7, 1, 1), (33, 2, 0), (5, 2, 2)])
def test_expert_gather_cpu(library, tokens, top_k, activation):
    model = single_op_model("TopKExpertGather", d=24, f=10, experts=3, top_k=top_k,
                            attrs={"top_k": top_k, "activation": activation})
    feeds = _feeds(model, {"tokens": tokens, "experts": 3}, seed=tokens)
    (y,) = _session(model, library).run(None, feeds)
    t = {k: torch.from_numpy(v) for k, v in {**_inits(model), **feeds}.items()}
    names = {0: "gelu", 1: "silu", 2: "gelu_tanh"}
    ry = get_op("TopKExpertGather").resolve("reference")(t["x"], t["w1"], t["w2"], t["experts"], t["weights"],
                                                         names[activation])
    check_op(torch.from_numpy(y), ry, torch.float32, "y")


def test_bad_expert_index_fails_with_a_message(library):
    model = single_op_model("TopKExpertGather", d=8, f=5, experts=3)
    feeds = _feeds(model, {"tokens": 4, "experts": 3}, seed=0)
    feeds["experts"][2, 0] = 7
    with pytest.raises(Exception, match="expert index out of range"):
        _session(model, library).run(None, feeds)


def test_custom_export_runs_in_the_ort_runner(tiny, tmp_path, monkeypatch):
    """jamba-tiny (attention + top-2 MoE) exported with --ops custom: the ORT runner registers our library and its
    prefill logits and states match the torch model's (fp32 bound)."""
    from mambadeploy.export.exporter import export_model
    from mambadeploy.runtime.ort_runner import OrtRunner
    from mambadeploy.validate.tolerances import assert_logits_close

    monkeypatch.setenv("MAMBADEPLOY_CACHE", str(tmp_path / "cache"))
    model = tiny("jamba-tiny")
    export_model(model, tmp_path / "exp", ops="custom")
    runner = OrtRunner(tmp_path / "exp", "cpu", threads=1)
    ids = torch.randint(0, model.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    logits, state = runner.prefill(ids, lengths=torch.tensor([19, 11]))
    with torch.no_grad():
        ref_logits, ref_state = model.prefill(ids, lengths=torch.tensor([19, 11]))
    assert_logits_close(logits, ref_logits, torch.float32, "custom-op prefill logits", check="ort_custom")
    for name, value in runner.state_to_torch(state).items():
        check_op(value.float(), ref_state[name].float(), torch.float32, name)


def test_cuda_build_compiles_and_loads():
    """The CUDA build (CPU + CUDA kernels in one library, CUDA runtime linked statically) compiles with nvcc here and
    loads into a CPU session, whose nodes still get the CPU kernels."""
    import shutil

    from mambadeploy.plugins.ort import build

    if not (shutil.which("nvcc") or os.environ.get("NVCC")):
        pytest.skip("no nvcc on this machine: the CUDA build of the ORT library cannot be compiled here")
    try:
        lib = build.build_library(cuda=True)
    except MambaDeployError as exc:
        if "fetching ORT headers" in str(exc):
            require(False, "ORT headers for the CUDA build", str(exc))
        raise
    assert lib.name == build.CUDA_LIBRARY_NAME
    model = single_op_model("CausalConv1d", dim=9, k=4, attrs={"activation": 1})
    feeds = _feeds(model, {"batch": 2, "length": 5}, seed=0)
    y, s = _session(model, lib).run(None, feeds)
    t = {k: torch.from_numpy(v) for k, v in {**_inits(model), **feeds}.items()}
    ry, rs = get_op("CausalConv1d").resolve("reference")(t["x"], t["weight"], t["bias"], t["initial_state"], "silu")
    check_op(torch.from_numpy(y), ry, torch.float32, "y")
    check_op(torch.from_numpy(s), rs, torch.float32, "final_state")


@pytest.mark.parametrize("op,name,kw", [("SelectiveScan", "D", {"dim": 6, "n": 16}),
                                        ("SelectiveScan", "delta_bias", {"dim": 6, "n": 16}),
                                        ("CausalConv1d", "bias", {"dim": 33, "k": 4})])
def test_mis_shaped_parameter_fails_with_a_message(library, op, name, kw):
    """The CPU and CUDA kernels share one shape rule (ops.h): a (d + 1,) parameter is refused, never read past its end."""
    from onnx import numpy_helper

    model = single_op_model(op, **kw)
    init = next(i for i in model.graph.initializer if i.name == name)
    init.CopyFrom(numpy_helper.from_array(np.zeros(kw["dim"] + 1, np.float32), name))
    feeds = _feeds(model, {"batch": 1, "length": 5}, seed=0)
    with pytest.raises(Exception, match=f"{op}: input {name} has shape \\[{kw['dim'] + 1}\\], not \\(d\\)"):
        _session(model, library).run(None, feeds)


ENTRY_NAMES = ["SelectiveScan", "CausalConv1d", "TopKExpertGather", "CausalConv1dUpdate", "SelectiveStateUpdate",
               "AddRMSNorm", "RoutedMoE", "DecodeAttention", "SparseLinear"]


@pytest.mark.parametrize("op", ENTRY_NAMES)
def test_every_input_shape_is_checked_as_the_registry_states(library, op):
    """The C++ shape check comes from the entry's symbolic shapes (opset_generated.h): with each input's last dim one
    too long in turn, the kernel refuses the node naming the same input as the registry's own resolver (op_shapes), or
    runs it where the registry accepts it too (a dim no other input carries); the well-shaped inputs run. Graph inputs
    carry no declared shapes, so ORT hands every shape to our kernel."""
    entry = get_op(op)
    assert set(ENTRY_NAMES) == set(opset_registry_dict)  # a new op joins this test
    model = single_op_model(op, weights_as_initializers=False)
    for vi in model.graph.input:
        vi.type.tensor_type.ClearField("shape")
    rng = np.random.default_rng(0)
    sizes = {"batch": 2, "length": 5, "tokens": 3}
    from op_graphs import op_input_specs

    specs = op_input_specs(op)
    good = {}
    for name in entry.inputs:
        shape = [sizes.get(d, d) for d in specs[name][0]]
        good[name] = rng.integers(0, 3, shape).astype(np.int64) if specs[name][1] == "int64" else \
            (-np.abs(rng.standard_normal(shape)) if name == "A" else rng.standard_normal(shape)).astype(np.float32)
    session = _session(model, library)
    session.run(None, good)
    refused = []
    for name in entry.inputs:
        bad = dict(good)
        shape = list(good[name].shape)
        shape[-1] += 1
        bad[name] = np.zeros(shape, good[name].dtype)
        try:
            entry.resolve_shapes([bad[n].shape for n in entry.inputs])
        except MambaDeployError as exc:  # the registry refuses: so must the kernel, naming the same input
            named = str(exc).split(": input ")[1].split(" ")[0]
            print(f"{op}: {name} {shape} -> {exc}")
            with pytest.raises(Exception, match=f"{op}: input {named} has shape "):
                session.run(None, bad)
            refused.append(name)
        else:  # a dim only this input carries (L, T): a longer sequence, which the kernel runs
            session.run(None, bad)
    assert len(refused) >= len(entry.inputs) - 2, refused
