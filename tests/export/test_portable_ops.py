"""Op parity: each custom node's portable (standard-op) expansion, run in ONNX Runtime, against the op's `_ref`,
at awkward shapes (lengths 1, 7, 33, 154; widths off block multiples; batch 1 and 3)."""

import numpy as np
import onnx
import pytest
import torch
from components import DEV_INSTALL, require_module
from onnx import helper

from mambadeploy import opset
from mambadeploy.export.onnx_ops import ONNX_TYPES, register_schemas
from mambadeploy.export.portable import expand_custom_nodes
from mambadeploy.models import ref_ops
from mambadeploy.validate.tolerances import op_checker

check_op = op_checker("onnx_portable")  # fp32 on the CPU: this op's measured bound

ort = require_module("onnxruntime", DEV_INSTALL)

TORCH_TO_NAME = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64"}


def run_single_node(op_name: str, inputs: dict, attrs: dict, n_out: int, opset_version: int = 21):
    """Build a graph with one `mambadeploy` node (absent optionals = None), expand it, run it in ORT on the CPU."""
    register_schemas()
    entry = opset.get_op(op_name)
    names = [n if inputs.get(n) is not None else "" for n in entry.inputs]
    while names and names[-1] == "":
        names.pop()
    outs = [f"out{i}" for i in range(n_out)]
    node = helper.make_node(op_name, names, outs, domain=opset.DOMAIN, name="node", **attrs)
    graph_inputs = [helper.make_tensor_value_info(n, ONNX_TYPES[TORCH_TO_NAME[t.dtype]], list(t.shape))
                    for n, t in inputs.items() if t is not None]
    graph = helper.make_graph([node], "g", graph_inputs, [helper.make_tensor_value_info(o, 0, None) for o in outs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset_version),
                                                    helper.make_opsetid(opset.DOMAIN, opset.OPSET_VERSION)])
    model = onnx.shape_inference.infer_shapes(model)
    assert expand_custom_nodes(model) == 1
    assert all(n.domain != opset.DOMAIN for n in model.graph.node)
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {n: t.numpy() for n, t in inputs.items() if t is not None}
    return [torch.from_numpy(np.asarray(o)) for o in sess.run(None, feeds)]


@pytest.mark.parametrize("batch,dim,L", [(1, 40, 1), (3, 40, 7), (1, 136, 33), (3, 24, 154)])
@pytest.mark.parametrize("with_state", [False, True])
def test_selective_scan(batch, dim, L, with_state):
    g = torch.Generator().manual_seed(batch * 1000 + L)
    N = 8
    r = lambda *s: torch.randn(*s, generator=g)
    inputs = {"u": r(batch, dim, L), "delta": r(batch, dim, L) * 0.5, "A": -torch.exp(r(dim, N) * 0.3),
              "B": r(batch, N, L), "C": r(batch, N, L), "D": r(dim), "z": r(batch, dim, L),
              "delta_bias": r(dim) * 0.1 - 2.0, "initial_state": r(batch, dim, N) if with_state else None}
    y, h = run_single_node("SelectiveScan", inputs, {"delta_softplus": 1}, 2)
    y_ref, h_ref = ref_ops.selective_scan_ref(
        inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], inputs["D"], inputs["z"],
        inputs["delta_bias"], True, inputs["initial_state"])
    check_op(y, y_ref, torch.float32, "y")
    check_op(h, h_ref, torch.float32, "last_state")


def test_selective_scan_pad_steps_keep_state():
    """A time step of -inf (left padding) must leave the state exactly unchanged: softplus(-inf) = 0."""
    g = torch.Generator().manual_seed(5)
    dim, N, L = 16, 4, 5
    delta = torch.randn(1, dim, L, generator=g)
    delta[:, :, :2] = float("-inf")
    inputs = {"u": torch.randn(1, dim, L, generator=g), "delta": delta, "A": -torch.rand(dim, N, generator=g),
              "B": torch.randn(1, N, L, generator=g), "C": torch.randn(1, N, L, generator=g)}
    y, h = run_single_node("SelectiveScan", inputs, {"delta_softplus": 1}, 2)
    y_ref, h_ref = ref_ops.selective_scan_ref(inputs["u"], delta, inputs["A"], inputs["B"], inputs["C"],
                                              delta_softplus=True)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    check_op(y, y_ref, torch.float32, "y")
    check_op(h, h_ref, torch.float32, "last_state")


@pytest.mark.parametrize("batch,dim,L", [(1, 40, 1), (3, 40, 7), (1, 136, 33), (3, 24, 154)])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("act", [0, 1])
def test_causal_conv1d(batch, dim, L, with_state, act):
    g = torch.Generator().manual_seed(batch * 100 + L)
    K = 4
    inputs = {"x": torch.randn(batch, dim, L, generator=g), "weight": torch.randn(dim, K, generator=g),
              "bias": torch.randn(dim, generator=g),
              "initial_state": torch.randn(batch, dim, K, generator=g) if with_state else None}
    y, s = run_single_node("CausalConv1d", inputs, {"activation": act}, 2)
    y_ref, s_ref = ref_ops.causal_conv1d_ref(inputs["x"], inputs["weight"], inputs["bias"], inputs["initial_state"],
                                             "silu" if act else None)
    check_op(y, y_ref, torch.float32, "y")
    check_op(s, s_ref, torch.float32, "final_state")


@pytest.mark.parametrize("T", [1, 7, 33, 154])
@pytest.mark.parametrize("router,k,activation", [("sigmoid_top1", 1, "gelu"), ("softmax_topk", 1, "silu"),
                                                 ("softmax_topk", 2, "silu"), ("softmax_topk", 2, "gelu_tanh")])
def test_expert_gather(T, router, k, activation):
    g = torch.Generator().manual_seed(T + 10 * k)
    d, F, E = 40, 24, 5
    x = torch.randn(T, d, generator=g)
    weights, experts = ref_ops.route_ref(torch.randn(T, E, generator=g), router, k)
    inputs = {"x": x, "w1": torch.randn(E, 2 * F, d, generator=g) / d ** 0.5,
              "w2": torch.randn(E, d, F, generator=g) / F ** 0.5, "experts": experts, "weights": weights}
    (y,) = run_single_node("TopKExpertGather", inputs,
                           {"activation": opset.ACTIVATION_CODES[activation], "top_k": k}, 1)
    y_ref = ref_ops.expert_gather_ref(x, inputs["w1"], inputs["w2"], experts, weights, activation)
    check_op(y, y_ref, torch.float32, "y")
