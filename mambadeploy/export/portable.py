"""Portable (standard-ONNX-op) expansions of the `mambadeploy` custom nodes, for a stock ONNX Runtime.

Each `expand_*(node, types)` returns the nodes that compute exactly what the op's `_ref` computes (fp32 math inside,
outputs in the op's dtypes) under the custom node's own input/output names. `expand_custom_nodes(model)` rewrites every
custom node of a graph, looking each expansion up through the op registry.

SelectiveScan becomes an ONNX Scan over time (the recurrence has no closed parallel form in standard ops short of
chunked segment sums); the body is 6 nodes on (b, d, N) tiles. Scan runs one step at a time, so this is the slow fallback
the custom op replaces. TopKExpertGather becomes the dense combine of the reference (every expert runs, a (T, E) matrix
zero off the chosen experts mixes them): shape-static, the right choice for prefill where tokens x k >= experts.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from .. import opset
from ..errors import MambaDeployError
from .graph_edit import INT64_MAX, GraphTypes, NodeEmitter, drop_unused_opset, replace_nodes

FLOAT = TensorProto.FLOAT


def _inputs(node, entry) -> dict:
    """Input name per formal parameter, absent optionals as None."""
    given = list(node.input) + [""] * (len(entry.inputs) - len(node.input))
    return {formal: (name or None) for formal, name in zip(entry.inputs, given)}


def _attrs(node, entry) -> dict:
    return entry.check_attributes({a.name: helper.get_attribute_value(a) for a in node.attribute})


def _silu(e: NodeEmitter, x: str) -> str:
    return e.op("Mul", [x, e.op("Sigmoid", [x])])


def activation(e: NodeEmitter, x: str, code: int) -> str:
    """The opset's activation codes (ACTIVATION_CODES) in standard ops (Gelu needs opset >= 20)."""
    if code == opset.ACTIVATION_CODES["silu"]:
        return _silu(e, x)
    if code == opset.ACTIVATION_CODES["gelu"]:
        return e.op("Gelu", [x])
    if code == opset.ACTIVATION_CODES["gelu_tanh"]:
        return e.op("Gelu", [x], approximate="tanh")
    raise MambaDeployError(f"activation code {code} has no portable expansion")


def _zeros_state(e: NodeEmitter, like: str, last_dim: str) -> str:
    """fp32 zeros of shape (like.shape[0], like.shape[1], last_dim)."""
    shape = e.op("Concat", [e.dims(like, 0, 2), last_dim], axis=0)
    return e.op("ConstantOfShape", [shape], value=helper.make_tensor("zero", FLOAT, [1], [0.0]))


# --------------------------------------------------------------------------- SelectiveScan
def _scan_body(A: str) -> onnx.GraphProto:
    """One time step on (b, d, N): h = exp(dt*A) * h + (dt*u) * B_t; y = sum_N h * C_t. A comes from the outer scope."""
    e = NodeEmitter("scan_body")
    dA = e.op("Exp", [e.op("Mul", ["dt_t", A])])
    h = e.op("Add", [e.op("Mul", [dA, "h"]), e.op("Mul", ["du_t", "B_t"])], outputs=["h_out"])
    e.op("ReduceSum", [e.op("Mul", [h, "C_t"]), e.const([2])], outputs=["y_t"], keepdims=0)
    vi = helper.make_tensor_value_info
    return helper.make_graph(
        e.nodes, "selective_scan_step",
        [vi("h", FLOAT, ["b", "d", "n"]), vi("dt_t", FLOAT, ["b", "d", 1]), vi("du_t", FLOAT, ["b", "d", 1]),
         vi("B_t", FLOAT, ["b", 1, "n"]), vi("C_t", FLOAT, ["b", 1, "n"])],
        [vi("h_out", FLOAT, ["b", "d", "n"]), vi("y_t", FLOAT, ["b", "d"])],
    )


def expand_selective_scan(node: onnx.NodeProto, types: GraphTypes) -> list[onnx.NodeProto]:
    entry = opset.get_op("SelectiveScan")
    i, attrs = _inputs(node, entry), _attrs(node, entry)
    y_out, state_out = node.output
    e = NodeEmitter(node.name or "SelectiveScan")
    f = {k: (e.cast(v, types.elem_type(v)) if v else None) for k, v in i.items()}
    dt = f["delta"]
    if f["delta_bias"]:
        dt = e.op("Add", [dt, e.op("Unsqueeze", [f["delta_bias"], e.const([0, 2])])])
    if attrs["delta_softplus"]:
        dt = e.op("Softplus", [dt])
    h0 = f["initial_state"] or _zeros_state(e, f["u"], e.dims(f["A"], 1, 2))
    last = e.const([3])
    dt4 = e.op("Unsqueeze", [dt, last])  # (b, d, L, 1): a Scan slice along axis 2 is (b, d, 1)
    du4 = e.op("Unsqueeze", [e.op("Mul", [dt, f["u"]]), last])
    B4 = e.op("Unsqueeze", [f["B"], e.const([1])])  # (b, 1, N, L): a slice along axis 3 is (b, 1, N)
    C4 = e.op("Unsqueeze", [f["C"], e.const([1])])
    _, y = e.op("Scan", [h0, dt4, du4, B4, C4], outputs=[state_out, e.fresh("y")], body=_scan_body(f["A"]),
                     num_scan_inputs=4, scan_input_axes=[2, 2, 3, 3], scan_output_axes=[2])
    if f["D"]:
        y = e.op("Add", [y, e.op("Mul", [f["u"], e.op("Unsqueeze", [f["D"], e.const([0, 2])])])])
    if f["z"]:
        y = e.op("Mul", [y, _silu(e, f["z"])])
    e.op("Cast", [y], outputs=[y_out], to=types.elem_type(i["u"]))
    return e.nodes


# --------------------------------------------------------------------------- CausalConv1d
def expand_causal_conv1d(node: onnx.NodeProto, types: GraphTypes) -> list[onnx.NodeProto]:
    entry = opset.get_op("CausalConv1d")
    i, attrs = _inputs(node, entry), _attrs(node, entry)
    y_out, state_out = node.output
    e = NodeEmitter(node.name or "CausalConv1d")
    x = e.cast(i["x"], types.elem_type(i["x"]))
    channels, K = types.static_dim(i["weight"], 0), types.static_dim(i["weight"], 1)
    init = (e.cast(i["initial_state"], types.elem_type(i["initial_state"])) if i["initial_state"]
            else _zeros_state(e, x, e.const([K])))
    full = e.op("Concat", [init, x], axis=2)  # (b, d, K + L): the state's last K-1 columns are the left context
    window = e.op("Slice", [full, e.const([1]), e.const([INT64_MAX]), e.const([2])])
    w = e.op("Unsqueeze", [e.cast(i["weight"], types.elem_type(i["weight"])), e.const([1])])  # (d, 1, K)
    conv_in = [window, w] + ([e.cast(i["bias"], types.elem_type(i["bias"]))] if i["bias"] else [])
    y = e.op("Conv", conv_in, group=channels, kernel_shape=[K])
    if attrs["activation"]:
        y = _silu(e, y)
    e.op("Cast", [y], outputs=[y_out], to=types.elem_type(i["x"]))
    e.op("Slice", [full, e.const([-K]), e.const([INT64_MAX]), e.const([2])], outputs=[state_out])
    return e.nodes


# --------------------------------------------------------------------------- TopKExpertGather
def expand_expert_gather(node: onnx.NodeProto, types: GraphTypes) -> list[onnx.NodeProto]:
    entry = opset.get_op("TopKExpertGather")
    i, attrs = _inputs(node, entry), _attrs(node, entry)
    e = NodeEmitter(node.name or "TopKExpertGather")
    x, w1, w2 = i["x"], i["w1"], i["w2"]
    weights = e.cast(i["weights"], types.elem_type(i["weights"]))
    experts = e.cast(i["experts"], types.elem_type(i["experts"]), TensorProto.INT64)
    zeros = e.op("ConstantOfShape", [e.op("Concat", [e.dims(x, 0, 1), e.dims(w1, 0, 1)], axis=0)],
                 value=helper.make_tensor("zero", FLOAT, [1], [0.0]))
    combine = e.op("ScatterElements", [zeros, experts, weights], axis=1, reduction="add")  # (T, E) fp32
    h = e.op("MatMul", [e.op("Unsqueeze", [x, e.const([0])]), e.op("Transpose", [w1], perm=[0, 2, 1])])  # (E, T, 2F)
    gate, up = e.op("Split", [h], outputs=2, axis=2, num_outputs=2)
    a = e.op("Mul", [activation(e, gate, attrs["activation"]), up])
    y = e.op("MatMul", [a, e.op("Transpose", [w2], perm=[0, 2, 1])])  # (E, T, d), in x's dtype like the reference
    mix = e.op("Unsqueeze", [e.op("Transpose", [combine], perm=[1, 0]), e.const([2])])  # (E, T, 1)
    out = e.op("ReduceSum", [e.op("Mul", [e.cast(y, types.elem_type(x)), mix]), e.const([0])], keepdims=0)
    e.op("Cast", [out], outputs=[node.output[0]], to=types.elem_type(x))
    return e.nodes


# --------------------------------------------------------------------------- driver
def expand_custom_nodes(model: onnx.ModelProto, only: set[str] | None = None, piece: str = "portable") -> int:
    """Replace the graph's `mambadeploy` nodes (or those whose op type is in `only`) by their expansions, found through
    the registry: `piece` ("portable", or "standard" for opset-27 ops where an op has that link, portable otherwise).
    Returns how many nodes were replaced."""
    from .onnx_ops import register_schemas

    register_schemas()
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    types = GraphTypes(inferred)
    replacements = {}
    for idx, node in enumerate(model.graph.node):
        if node.domain != opset.DOMAIN or (only is not None and node.op_type not in only):
            continue
        entry = opset.get_op(node.op_type)
        expand = entry.resolve(piece if piece in entry.links else "portable")
        replacements[idx] = expand(node, types)
    replace_nodes(model, replacements)
    drop_unused_opset(model, opset.DOMAIN)
    return len(replacements)
