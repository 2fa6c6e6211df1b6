"""Portable (standard-ONNX-op) expansions of the decode step's `mambadeploy` nodes: CausalConv1dUpdate,
SelectiveStateUpdate, AddRMSNorm and RoutedMoE. Each computes what the op's `_ref` computes (fp32 math inside, outputs in
the op's dtypes) under the custom node's own input/output names, so `--ops portable` decode graphs are the custom graph
with these nodes swapped in (one trace gives every op mode).

DecodeAttention expands to the reference's masked form: the slot written with a Where over the whole cache, scores over
every slot with the ones past pos[b] masked out. Its cost follows the cache's length, not its fill — the portable
fallback; the custom node reads only the filled slots.

RoutedMoE expands to the reference's gather branch: the chosen experts' weights are Gathered (copied) and multiplied.
That copy is exactly what the custom node avoids; here it keeps a stock runtime reading k experts, not all E.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto

from .. import opset
from .graph_edit import INT64_MAX, GraphTypes, NodeEmitter
from .portable import _attrs, _inputs, _silu, activation

FLOAT = TensorProto.FLOAT


def _floats(e: NodeEmitter, node, entry, types: GraphTypes) -> dict:
    i = _inputs(node, entry)
    return {k: (e.cast(v, types.elem_type(v)) if v else None) for k, v in i.items()}


def expand_conv_update(node: onnx.NodeProto, types: GraphTypes) -> list[onnx.NodeProto]:
    entry = opset.get_op("CausalConv1dUpdate")
    attrs = _attrs(node, entry)
    e = NodeEmitter(node.name or entry.name)
    f = _floats(e, node, entry, types)
    y_out, state_out = node.output
    shifted = e.op("Slice", [f["conv_state"], e.const([1]), e.const([INT64_MAX]), e.const([2])])
    new_state = e.op("Concat", [shifted, e.op("Unsqueeze", [f["x"], e.const([2])])], outputs=[state_out], axis=2)
    y = e.op("ReduceSum", [e.op("Mul", [new_state, f["weight"]]), e.const([2])], keepdims=0)
    if f["bias"]:
        y = e.op("Add", [y, f["bias"]])
    if attrs["activation"]:
        y = _silu(e, y)
    e.op("Cast", [y], outputs=[y_out], to=types.elem_type(node.input[0]))
    return e.nodes


def expand_state_update(node: onnx.NodeProto, types: GraphTypes) -> list[onnx.NodeProto]:
    entry = opset.get_op("SelectiveStateUpdate")
    attrs = _attrs(node, entry)
    e = NodeEmitter(node.name or entry.name)
    f = _floats(e, node, entry, types)
    y_out, state_out = node.output
    dt = f["dt"]
    if f["dt_bias"]:
        dt = e.op("Add", [dt, f["dt_bias"]])
    if attrs["dt_softplus"]:
        dt = e.op("Softplus", [dt])
    decay = e.op("Exp", [e.op("Mul", [e.op("Unsqueeze", [dt, e.const([2])]), f["A"]])])  # (b, d, N)
    drive = e.op("Mul", [e.op("Unsqueeze", [e.op("Mul", [dt, f["x"]]), e.const([2])]),
                         e.op("Unsqueeze", [f["B"], e.const([1])])])
    h = e.op("Add", [e.op("Mul", [decay, f["state"]]), drive], outputs=[state_out])
    y = e.op("ReduceSum", [e.op("Mul", [h, e.op("Unsqueeze", [f["C"], e.const([1])])]), e.const([2])], keepdims=0)
    if f["D"]:
        y = e.op("Add", [y, e.op("Mul", [f["x"], f["D"]])])
    if f["z"]:
        y = e.op("Mul", [y, _silu(e, f["z"])])
    e.op("Cast", [y], outputs=[y_out], to=types.elem_type(node.input[1]))
    return e.nodes


def expand_add_rms_norm(node: onnx.NodeProto, types: GraphTypes) -> list[onnx.NodeProto]:
    entry = opset.get_op("AddRMSNorm")
    attrs = _attrs(node, entry)
    e = NodeEmitter(node.name or entry.name)
    f = _floats(e, node, entry, types)
    y_out, res_out = node.output
    res = e.op("Add", [f["residual"], f["x"]], outputs=[res_out])
    # Add, Pow(2), ReduceMean, Add(eps), Sqrt, Div, Mul(weight): the pattern ONNX Runtime fuses into one
    # SkipSimplifiedLayerNormalization (or SimplifiedLayerNormalization) kernel, where Mul(x, x) or Reciprocal stay
    # seven separate kernels
    two = e.const([2.0], dtype="float32")
    mean_sq = e.op("ReduceMean", [e.op("Pow", [res, two]), e.const([-1])], keepdims=1)  # axes as input: opset >= 18
    eps = e.const([attrs["epsilon"]], dtype="float32")
    y = e.op("Mul", [e.op("Div", [res, e.op("Sqrt", [e.op("Add", [mean_sq, eps])])]), f["weight"]])
    e.op("Cast", [y], outputs=[y_out], to=types.elem_type(node.input[0]))
    return e.nodes


def expand_routed_moe(node: onnx.NodeProto, types: GraphTypes) -> list[onnx.NodeProto]:
    entry = opset.get_op("RoutedMoE")
    i, attrs = _inputs(node, entry), _attrs(node, entry)
    e = NodeEmitter(node.name or entry.name)
    x, w1, w2 = i["x"], i["w1"], i["w2"]
    t = types.elem_type(x)
    rw = e.cast(i["router_weight"], types.elem_type(i["router_weight"]), t)
    gemm_in = [x, rw] + ([e.cast(i["router_bias"], types.elem_type(i["router_bias"]), t)] if i["router_bias"] else [])
    # (T, E) computed in x's dtype, as the model's nn.Linear gives them, then routed in fp32
    logits = e.cast(e.op("Gemm", gemm_in, transB=1), t)
    if attrs["router"] == opset.ROUTER_CODES["sigmoid_top1"]:
        experts = e.op("ArgMax", [logits], axis=1, keepdims=1)
        weights = e.op("Sigmoid", [e.op("GatherElements", [logits, experts], axis=1)])
    else:
        probs = e.op("Softmax", [logits], axis=1)
        weights, experts = e.op("TopK", [probs, e.const([attrs["top_k"]])], outputs=2, axis=1, largest=1, sorted=1)
    flat = e.op("Reshape", [experts, e.const([-1])])
    tkd = e.op("Concat", [e.dims(experts, 0, 2), e.dims(x, 1, 2)], axis=0)  # (T, k, d)
    flat_shape = e.op("Concat", [e.const([-1]), e.dims(x, 1, 2), e.const([1])], axis=0)
    xk = e.op("Reshape", [e.op("Expand", [e.op("Unsqueeze", [x, e.const([1])]), tkd]), flat_shape])  # (T*k, d, 1)
    h = e.op("Squeeze", [e.op("MatMul", [e.op("Gather", [w1, flat], axis=0), xk]), e.const([2])])  # (T*k, 2F)
    gate, up = e.op("Split", [h], outputs=2, axis=1, num_outputs=2)
    a = e.op("Unsqueeze", [e.op("Mul", [activation(e, gate, attrs["activation"]), up]), e.const([2])])
    y = e.op("Reshape", [e.op("MatMul", [e.op("Gather", [w2, flat], axis=0), a]), tkd])  # (T, k, d) in x's dtype
    mixed = e.op("Mul", [e.cast(y, t), e.op("Unsqueeze", [weights, e.const([2])])])
    e.op("Cast", [e.op("ReduceSum", [mixed, e.const([1])], keepdims=0)], outputs=[node.output[0]], to=t)
    return e.nodes


def expand_decode_attention(node: onnx.NodeProto, types: GraphTypes) -> list[onnx.NodeProto]:
    import math

    entry = opset.get_op("DecodeAttention")
    i, attrs = _inputs(node, entry), _attrs(node, entry)
    e = NodeEmitter(node.name or entry.name)
    out, present_key, present_value = node.output
    t = types.elem_type(i["q"])
    heads, head_dim = types.static_dim(i["q"], 1), types.static_dim(i["q"], 2)
    kv_heads = types.static_dim(i["key_cache"], 1)
    pos = e.cast(i["pos"], types.elem_type(i["pos"]), TensorProto.INT64)
    slots = e.op("Range", [e.const(0), e.op("Squeeze", [e.dims(i["key_cache"], 2, 3), e.const([0])]), e.const(1)])
    pos_col = e.op("Unsqueeze", [pos, e.const([1])])  # (B, 1)
    write = e.op("Unsqueeze", [e.op("Equal", [slots, pos_col]), e.const([1, 3])])  # (B, 1, S, 1)
    caches = []  # fp32 (ORT's CPU Where has no bf16 kernel); the new k/v rounded to the cache dtype first
    for new, past, present in ((i["k"], i["key_cache"], present_key), (i["v"], i["value_cache"], present_value)):
        ct = types.elem_type(past)
        new = e.op("Unsqueeze", [e.cast(e.cast(new, types.elem_type(new), ct), ct), e.const([2])])
        caches.append(e.op("Where", [write, new, e.cast(past, ct)]))
        e.op("Cast", [caches[-1]], outputs=[present], to=ct)
    scale = attrs["scale"] or 1.0 / math.sqrt(head_dim)
    group = e.const([0, kv_heads, heads // kv_heads, head_dim])  # (B, KV, G, hd): GQA without repeating the cache
    q = e.op("Reshape", [e.cast(i["q"], t), group])
    scores = e.op("Mul", [e.op("MatMul", [q, e.op("Transpose", [caches[0]], perm=[0, 1, 3, 2])]),
                          e.const([scale], dtype="float32")])  # (B, KV, G, S)
    seen = e.op("Unsqueeze", [e.op("LessOrEqual", [slots, pos_col]), e.const([1, 2])])  # (B, 1, 1, S)
    scores = e.op("Where", [seen, scores, e.const([-float("inf")], dtype="float32")])
    mixed = e.op("MatMul", [e.op("Softmax", [scores], axis=-1), caches[1]])  # (B, KV, G, hd)
    e.op("Cast", [e.op("Reshape", [mixed, e.const([0, heads, head_dim])])], outputs=[out], to=t)
    return e.nodes


def expand_sparse_linear(node: onnx.NodeProto, types: GraphTypes) -> list[onnx.NodeProto]:
    """SCAP's mask in standard ops, as sparsity.Sparsifier.linear traces: centre, threshold, round the kept values to
    x's dtype, then a dense MatMul (a stock runtime reads every weight row; the custom node skips the dropped ones)."""
    entry = opset.get_op("SparseLinear")
    i, attrs = _inputs(node, entry), _attrs(node, entry)
    e = NodeEmitter(node.name or entry.name)
    t = types.elem_type(i["x"])
    centred = e.op("Sub", [e.cast(i["x"], t), e.const([attrs["mode"]], dtype="float32")])
    keep = e.op("Greater", [e.op("Abs", [centred]), e.const([attrs["threshold"]], dtype="float32")])
    kept = e.op("Where", [keep, centred, e.const([0.0], dtype="float32")])
    kept = e.cast(e.cast(kept, FLOAT, t), t)  # rounded to x's dtype, as the reference's s(x) is
    weight = e.op("Transpose", [e.cast(i["weight"], types.elem_type(i["weight"]))], perm=[1, 0])
    y = e.op("MatMul", [kept, weight])
    if i["bias"]:
        y = e.op("Add", [y, e.cast(i["bias"], types.elem_type(i["bias"]))])
    e.op("Cast", [y], outputs=[node.output[0]], to=t)
    return e.nodes
