"""`--ops standard`: Mamba-1 in plain ONNX opset 27, no custom library. ONNX 1.23 made `LinearAttention` and
`CausalConvWithState` standard ops (onnxruntime >= 1.32 runs both in the default domain).

`LinearAttention` with update_rule "gated" is Mamba-1's recurrence exactly: heads = d_inner, d_k = d_state, d_v = 1,
per-key-dimension decay g = dt * A (log space), key = B and query = C (the same for every channel), value = dt * x,
scale 1, state (B, d_inner, d_state, 1). So SelectiveScan and SelectiveStateUpdate become one LinearAttention node
each (plus the elementwise softplus, D skip and silu(z) gate), CausalConv1d and CausalConv1dUpdate one
CausalConvWithState node each (ORT keeps K-1 state columns, we keep K: the K-column state is rebuilt with a
Concat/Slice). The other registry ops take their portable expansions. The packed layout costs memory: decay, key and
query are (B, T, d_inner * d_state) tensors.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto

from .. import opset
from .graph_edit import INT64_MAX, GraphTypes, NodeEmitter
from .portable import _attrs, _inputs, _silu, _zeros_state

FLOAT = TensorProto.FLOAT
STANDARD_OPSET = 27  # LinearAttention, CausalConvWithState


def _floats(e: NodeEmitter, i: dict, types: GraphTypes) -> dict:
    return {k: (e.cast(v, types.elem_type(v)) if v else None) for k, v in i.items()}


def _dt(e: NodeEmitter, dt: str, bias: str | None, softplus: bool, bias_axes: list[int]) -> str:
    if bias:
        dt = e.op("Add", [dt, e.op("Unsqueeze", [bias, e.const(bias_axes)]) if bias_axes else bias])
    return e.op("Softplus", [dt]) if softplus else dt


def _per_channel(e: NodeEmitter, t_by_n: str, like_btdn: str) -> str:
    """(b, T, N) -> the same N values for every channel, packed (b, T, d * N) as LinearAttention takes keys/queries."""
    full = e.op("Expand", [e.op("Unsqueeze", [t_by_n, e.const([2])]), e.op("Shape", [like_btdn])])
    return e.op("Reshape", [full, e.const([0, 0, -1])])


def _linear_attention(e: NodeEmitter, query, key, value, past, decay, heads: int):
    return e.op("LinearAttention", [query, key, value, past, decay], outputs=2, update_rule="gated",
                q_num_heads=heads, kv_num_heads=heads, scale=1.0)


def _gate(e: NodeEmitter, y: str, u: str, D: str | None, z: str | None, d_axes: list[int]) -> str:
    if D:
        y = e.op("Add", [y, e.op("Mul", [u, e.op("Unsqueeze", [D, e.const(d_axes)]) if d_axes else D])])
    return e.op("Mul", [y, _silu(e, z)]) if z else y


def expand_scan_standard(node: onnx.NodeProto, types: GraphTypes) -> list[onnx.NodeProto]:
    entry = opset.get_op("SelectiveScan")
    i, attrs = _inputs(node, entry), _attrs(node, entry)
    e = NodeEmitter(node.name or entry.name)
    f = _floats(e, i, types)
    heads = types.static_dim(i["A"], 0)
    dt = e.op("Transpose", [_dt(e, f["delta"], f["delta_bias"], attrs["delta_softplus"], [0, 2])], perm=[0, 2, 1])
    decay4 = e.op("Mul", [e.op("Unsqueeze", [dt, e.const([3])]), f["A"]])  # (b, L, d, N)
    decay = e.op("Reshape", [decay4, e.const([0, 0, -1])])
    key = _per_channel(e, e.op("Transpose", [f["B"]], perm=[0, 2, 1]), decay4)
    query = _per_channel(e, e.op("Transpose", [f["C"]], perm=[0, 2, 1]), decay4)
    value = e.op("Mul", [dt, e.op("Transpose", [f["u"]], perm=[0, 2, 1])])  # (b, L, d): d_v = 1
    h0 = f["initial_state"] or _zeros_state(e, f["u"], e.dims(f["A"], 1, 2))
    out, state = _linear_attention(e, query, key, value, e.op("Unsqueeze", [h0, e.const([3])]), decay, heads)
    y = _gate(e, e.op("Transpose", [out], perm=[0, 2, 1]), f["u"], f["D"], f["z"], [0, 2])
    e.op("Cast", [y], outputs=[node.output[0]], to=types.elem_type(i["u"]))
    e.op("Squeeze", [state, e.const([3])], outputs=[node.output[1]])
    return e.nodes


def expand_state_update_standard(node: onnx.NodeProto, types: GraphTypes) -> list[onnx.NodeProto]:
    entry = opset.get_op("SelectiveStateUpdate")
    i, attrs = _inputs(node, entry), _attrs(node, entry)
    e = NodeEmitter(node.name or entry.name)
    f = _floats(e, i, types)
    heads = types.static_dim(i["A"], 0)
    dt = _dt(e, f["dt"], f["dt_bias"], attrs["dt_softplus"], [])  # (b, d)
    decay4 = e.op("Unsqueeze", [e.op("Mul", [e.op("Unsqueeze", [dt, e.const([2])]), f["A"]]), e.const([1])])
    decay = e.op("Reshape", [decay4, e.const([0, 0, -1])])  # (b, 1, d * N)
    key = _per_channel(e, e.op("Unsqueeze", [f["B"], e.const([1])]), decay4)
    query = _per_channel(e, e.op("Unsqueeze", [f["C"], e.const([1])]), decay4)
    value = e.op("Unsqueeze", [e.op("Mul", [dt, f["x"]]), e.const([1])])  # (b, 1, d)
    past = e.op("Unsqueeze", [f["state"], e.const([3])])
    out, state = _linear_attention(e, query, key, value, past, decay, heads)
    y = _gate(e, e.op("Squeeze", [out, e.const([1])]), f["x"], f["D"], f["z"], [])
    e.op("Cast", [y], outputs=[node.output[0]], to=types.elem_type(i["x"]))
    e.op("Squeeze", [state, e.const([3])], outputs=[node.output[1]])
    return e.nodes


def _conv(e: NodeEmitter, x: str, f: dict, past: str | None, silu: bool) -> str:
    weight = e.op("Unsqueeze", [f["weight"], e.const([1])])  # (d, 1, K)
    y, _ = e.op("CausalConvWithState", [x, weight, f["bias"] or "", past or ""], outputs=2,
                activation="silu" if silu else "none")
    return y


def expand_conv_standard(node: onnx.NodeProto, types: GraphTypes) -> list[onnx.NodeProto]:
    entry = opset.get_op("CausalConv1d")
    i, attrs = _inputs(node, entry), _attrs(node, entry)
    e = NodeEmitter(node.name or entry.name)
    f = _floats(e, i, types)
    K = types.static_dim(i["weight"], 1)
    init = f["initial_state"]
    past = e.op("Slice", [init, e.const([1]), e.const([INT64_MAX]), e.const([2])]) if init else None
    y = _conv(e, f["x"], f, past, attrs["activation"] == 1)
    e.op("Cast", [y], outputs=[node.output[0]], to=types.elem_type(i["x"]))
    full = e.op("Concat", [init or _zeros_state(e, f["x"], e.const([K])), f["x"]], axis=2)
    e.op("Slice", [full, e.const([-K]), e.const([INT64_MAX]), e.const([2])], outputs=[node.output[1]])
    return e.nodes


def expand_conv_update_standard(node: onnx.NodeProto, types: GraphTypes) -> list[onnx.NodeProto]:
    entry = opset.get_op("CausalConv1dUpdate")
    i, attrs = _inputs(node, entry), _attrs(node, entry)
    e = NodeEmitter(node.name or entry.name)
    f = _floats(e, i, types)
    x3 = e.op("Unsqueeze", [f["x"], e.const([2])])  # (b, d, 1)
    past = e.op("Slice", [f["conv_state"], e.const([1]), e.const([INT64_MAX]), e.const([2])])
    y = _conv(e, x3, f, past, attrs["activation"] == 1)
    e.op("Cast", [e.op("Squeeze", [y, e.const([2])])], outputs=[node.output[0]], to=types.elem_type(i["x"]))
    e.op("Concat", [past, x3], outputs=[node.output[1]], axis=2)
    return e.nodes


def to_standard_opset(model: onnx.ModelProto) -> None:
    """Raise the default-domain opset import to 27 (the graph's other ops keep their semantics from 21 on)."""
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = max(o.version, STANDARD_OPSET)
    model.ir_version = max(model.ir_version, 10)
