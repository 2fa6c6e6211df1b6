"""The decode step's registry ops (CausalConv1dUpdate, SelectiveStateUpdate, AddRMSNorm, RoutedMoE), each as one node:
our ORT CPU kernel and the op's portable expansion (standard ops, run by stock ORT) against the `_ref`, over awkward
shapes drawn by hypothesis (odd widths, batch 1 and 3, top-1 and top-2, omitted optional inputs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from components import DEV_INSTALL, require_module
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mambadeploy.opset import ACTIVATION_CODES, ROUTER_CODES, get_op
from mambadeploy.validate.tolerances import op_checker

check_op = op_checker("ort_decode_ops")  # fp32 on the CPU: this op's measured bound

ort = require_module("onnxruntime", DEV_INSTALL)

from op_graphs import single_op_model

# derandomized: the same 12 examples every run, so the measured fp32 bound (tolerances.OP_FP32_CPU) cannot flake
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
ACT_NAMES = {code: name for name, code in ACTIVATION_CODES.items()}
ROUTER_NAMES = {code: name for name, code in ROUTER_CODES.items()}


def _portable(model):
    """The same one-node model with the node replaced by its registry expansion (opset 21: Gelu, ReduceMean axes)."""
    from onnx import helper

    from mambadeploy.export.portable import expand_custom_nodes

    model.opset_import[0].CopyFrom(helper.make_opsetid("", 21))
    node = model.graph.node[0]
    keep = [a for a in node.attribute if a.name != "plugin_version"]  # a TensorRT hint, not an op attribute
    del node.attribute[:]
    node.attribute.extend(keep)
    expand_custom_nodes(model)
    return model


def _run(model, feeds, library=None):
    so = ort.SessionOptions()
    if library is not None:
        so.register_custom_ops_library(str(library))
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [torch.from_numpy(v) for v in sess.run(None, feeds)]


def _feeds(model, dims, seed):
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        shape = [dims[d.dim_param] if d.dim_param else d.dim_value for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _tensors(model, feeds):
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {k: torch.from_numpy(np.array(v)) for k, v in {**inits, **feeds}.items()}


def _check(name, outputs, expected):
    for out, ref, what in zip(outputs, expected, get_op(name).outputs):
        check_op(out, ref, torch.float32, f"{name}.{what}")


@SETTINGS
@given(batch=st.sampled_from([1, 3]), dim=st.sampled_from([1, 7, 33, 130]), k=st.sampled_from([2, 4]),
       bias=st.booleans(), activation=st.sampled_from([0, 1]))
def test_conv_update(library, batch, dim, k, bias, activation):
    omit = () if bias else ("bias",)
    model = single_op_model("CausalConv1dUpdate", dim=dim, k=k, omit=omit, attrs={"activation": activation})
    feeds = _feeds(model, {"batch": batch}, seed=dim)
    t = _tensors(model, feeds)
    ref = get_op("CausalConv1dUpdate").resolve("reference")(t["x"], t["conv_state"], t["weight"], t.get("bias"),
                                                            "silu" if activation else None)
    _check("CausalConv1dUpdate", _run(model, feeds, library), ref)
    _check("CausalConv1dUpdate", _run(_portable(model), feeds), ref)


@SETTINGS
@given(batch=st.sampled_from([1, 3]), dim=st.sampled_from([1, 5, 33, 130]), n=st.sampled_from([1, 4, 16]),
       optional=st.booleans(), softplus=st.sampled_from([0, 1]))
def test_state_update(library, batch, dim, n, optional, softplus):
    omit = () if optional else ("D", "z", "dt_bias")
    model = single_op_model("SelectiveStateUpdate", dim=dim, n=n, omit=omit, attrs={"dt_softplus": softplus})
    feeds = _feeds(model, {"batch": batch}, seed=dim * n)
    t = _tensors(model, feeds)
    ref = get_op("SelectiveStateUpdate").resolve("reference")(
        t["state"], t["x"], t["dt"], t["A"], t["B"], t["C"], t.get("D"), t.get("z"), t.get("dt_bias"), bool(softplus))
    _check("SelectiveStateUpdate", _run(model, feeds, library), ref)
    _check("SelectiveStateUpdate", _run(_portable(model), feeds), ref)


@SETTINGS
@given(batch=st.sampled_from([1, 3]), d=st.sampled_from([1, 7, 33, 257, 1030]), eps=st.sampled_from([1e-5, 1e-6]))
def test_add_rms_norm(library, batch, d, eps):
    model = single_op_model("AddRMSNorm", d=d, attrs={"epsilon": eps})
    feeds = _feeds(model, {"batch": batch}, seed=d)
    t = _tensors(model, feeds)
    ref = get_op("AddRMSNorm").resolve("reference")(t["x"], t["residual"], t["weight"], eps)
    _check("AddRMSNorm", _run(model, feeds, library), ref)
    _check("AddRMSNorm", _run(_portable(model), feeds), ref)


@SETTINGS
@given(tokens=st.sampled_from([1, 3, 9]), d=st.sampled_from([8, 23, 40]), f=st.sampled_from([5, 16]),
       experts=st.sampled_from([4, 5, 8]), route=st.sampled_from([("sigmoid_top1", 1), ("softmax_topk", 1),
                                                                   ("softmax_topk", 2)]),
       activation=st.sampled_from([0, 1, 2]), bias=st.booleans())
def test_routed_moe(library, tokens, d, f, experts, route, activation, bias):
    router, top_k = route
    omit = () if bias else ("router_bias",)
    model = single_op_model("RoutedMoE", d=d, f=f, experts=experts, omit=omit,
                            attrs={"router": ROUTER_CODES[router], "top_k": top_k, "activation": activation})
    feeds = _feeds(model, {"tokens": tokens}, seed=tokens * d)
    t = _tensors(model, feeds)
    ref = get_op("RoutedMoE").resolve("reference")(t["x"], t["router_weight"], t.get("router_bias"), t["w1"], t["w2"],
                                                   router, top_k, ACT_NAMES[activation])
    _check("RoutedMoE", _run(model, feeds, library), (ref,))
    _check("RoutedMoE", _run(_portable(model), feeds), (ref,))


def test_routed_moe_reads_the_chosen_experts_only(library):
    """An expert nobody chose may hold NaN: the output stays finite (its weights are never read, not even multiplied by
    a zero combine weight)."""
    from onnx import numpy_helper

    model = single_op_model("RoutedMoE", d=16, f=8, experts=4, omit=("router_bias",),
                            attrs={"router": ROUTER_CODES["sigmoid_top1"], "top_k": 1})
    feeds = _feeds(model, {"tokens": 2}, seed=0)
    t = _tensors(model, feeds)
    logits = t["x"] @ t["router_weight"].T
    unused = min(set(range(4)) - set(logits.argmax(-1).tolist()))
    for init in model.graph.initializer:
        if init.name in ("w1", "w2"):
            arr = numpy_helper.to_array(init).copy()
            arr[unused] = np.nan
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    (y,) = _run(model, feeds, library)
    assert torch.isfinite(y).all()


def test_routed_moe_refuses_top_k_above_experts(library):
    model = single_op_model("RoutedMoE", d=8, f=4, experts=3,
                            attrs={"router": ROUTER_CODES["softmax_topk"], "top_k": 4})
    with pytest.raises(Exception, match="top_k must be in"):
        _run(model, _feeds(model, {"tokens": 2}, seed=0), library)
