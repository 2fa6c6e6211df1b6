"""Small ONNX graphs holding one of our custom-op nodes each (domain `mambadeploy`), made with onnx.helper, for the
TensorRT-RTX parse/build tests and the ORT custom-op tests. Shapes follow the op docstrings in models/ref_ops.py; batch
and length are symbolic so a build needs an optimization profile, as the real export does."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mambadeploy.opset import DOMAIN, get_op

ONNX_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16,
               "int64": TensorProto.INT64, "int32": TensorProto.INT32}


def op_input_specs(name: str, dim=6, n=4, k=4, d=8, f=5, experts=3, top_k=1, dtype="float32", param_dtype=None):
    """{input: (shape with 'batch'/'length'/'tokens' symbols, dtype)} for one op, in the op's input order."""
    p = param_dtype or dtype
    if name == "SelectiveScan":
        return {"u": (("batch", dim, "length"), dtype), "delta": (("batch", dim, "length"), dtype),
                "A": ((dim, n), "float32"), "B": (("batch", n, "length"), dtype), "C": (("batch", n, "length"), dtype),
                "D": ((dim,), p), "z": (("batch", dim, "length"), dtype), "delta_bias": ((dim,), p),
                "initial_state": (("batch", dim, n), "float32")}
    if name == "CausalConv1d":
        return {"x": (("batch", dim, "length"), dtype), "weight": ((dim, k), p), "bias": ((dim,), p),
                "initial_state": (("batch", dim, k), "float32")}
    if name == "TopKExpertGather":
        return {"x": (("tokens", d), dtype), "w1": ((experts, 2 * f, d), p), "w2": ((experts, d, f), p),
                "experts": (("tokens", top_k), "int64"), "weights": (("tokens", top_k), "float32")}
    if name == "CausalConv1dUpdate":
        return {"x": (("batch", dim), dtype), "conv_state": (("batch", dim, k), "float32"), "weight": ((dim, k), p),
                "bias": ((dim,), p)}
    if name == "SelectiveStateUpdate":
        return {"state": (("batch", dim, n), "float32"), "x": (("batch", dim), dtype), "dt": (("batch", dim), dtype),
                "A": ((dim, n), "float32"), "B": (("batch", n), dtype), "C": (("batch", n), dtype), "D": ((dim,), p),
                "z": (("batch", dim), dtype), "dt_bias": ((dim,), p)}
    if name == "AddRMSNorm":
        return {"x": (("batch", d), dtype), "residual": (("batch", d), "float32"), "weight": ((d,), p)}
    if name == "RoutedMoE":
        return {"x": (("tokens", d), dtype), "router_weight": ((experts, d), p), "router_bias": ((experts,), p),
                "w1": ((experts, 2 * f, d), p), "w2": ((experts, d, f), p)}
    if name == "DecodeAttention":  # GQA: 4 query heads on 2 KV heads, head_dim 12 (jamba-tiny's), a 37-slot cache
        return {"q": (("batch", 4, 12), dtype), "k": (("batch", 2, 12), dtype), "v": (("batch", 2, 12), dtype),
                "key_cache": (("batch", 2, 37, 12), dtype), "value_cache": (("batch", 2, 37, 12), dtype),
                "pos": (("batch",), "int64")}
    if name == "SparseLinear":  # x (rows, K) @ weight (N, K)^T + bias (N,)
        return {"x": (("batch", d), dtype), "weight": ((f, d), p), "bias": ((f,), p)}
    raise KeyError(name)


def single_op_model(name: str, attrs: dict | None = None, weights_as_initializers=True, seed=0, omit=(), **spec_kw):
    """A model whose graph is one `name` node. Parameters (inputs without a symbolic dim) become initializers;
    inputs named in `omit` are passed as empty names (ONNX optional input left out)."""
    entry = get_op(name)
    specs = op_input_specs(name, **spec_kw)
    rng = np.random.default_rng(seed)
    graph_inputs, inits, node_inputs = [], [], []
    for inp in entry.inputs:
        if inp in omit:
            node_inputs.append("")
            continue
        shape, dtype = specs[inp]
        node_inputs.append(inp)
        if weights_as_initializers and all(isinstance(s, int) for s in shape):
            arr = rng.standard_normal(shape).astype(np.float32)
            if name in ("SelectiveScan", "SelectiveStateUpdate") and inp == "A":
                arr = -np.exp(arr * 0.5)
            tensor = numpy_helper.from_array(arr, inp)
            if dtype != "float32":
                tensor = helper.make_tensor(inp, ONNX_DTYPES[dtype], shape,
                                            vals=_cast_bits(arr, dtype), raw=True)
            inits.append(tensor)
        else:
            graph_inputs.append(helper.make_tensor_value_info(inp, ONNX_DTYPES[dtype], list(shape)))
    in_dtypes = tuple(specs[i][1] for i in entry.inputs)
    out_dtypes = entry.dtype_rule(in_dtypes, {})
    outputs = [helper.make_tensor_value_info(o, ONNX_DTYPES[t], None) for o, t in zip(entry.outputs, out_dtypes)]
    node = helper.make_node(name, node_inputs, list(entry.outputs), domain=DOMAIN, name=f"{name}_0",
                            plugin_version=str(entry.version), **entry.check_attributes(attrs or {}))
    graph = helper.make_graph([node], f"{name}_graph", graph_inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 8
    return model


def _cast_bits(arr, dtype):
    if dtype == "float16":
        return arr.astype(np.float16).tobytes()
    import torch

    return torch.from_numpy(arr).to(torch.bfloat16).view(torch.int16).numpy().tobytes()


def save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)


def with_fp32_io(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with fp32 graph inputs and outputs: Cast nodes turn each fp16/bf16 input into the node's dtype
    and each fp16/bf16 output back to fp32 (exact), so numpy can feed and read bf16 graphs."""
    graph = model.graph
    low = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
    casts_in, casts_out = [], []
    for vi in graph.input:
        t = vi.type.tensor_type
        if t.elem_type in low:
            inner = f"{vi.name}.low"
            casts_in.append(helper.make_node("Cast", [vi.name], [inner], to=t.elem_type, name=f"cast_{vi.name}"))
            for node in graph.node:
                node.input[:] = [inner if i == vi.name else i for i in node.input]
            t.elem_type = TensorProto.FLOAT
    for node in graph.node:
        for k, out in enumerate(node.output):
            vi = next(o for o in graph.output if o.name == out)
            if vi.type.tensor_type.elem_type in low:
                node.output[k] = f"{out}.low"
                casts_out.append(helper.make_node("Cast", [f"{out}.low"], [out], to=TensorProto.FLOAT,
                                                  name=f"cast_{out}"))
                vi.type.tensor_type.elem_type = TensorProto.FLOAT
    nodes = casts_in + list(graph.node) + casts_out
    del graph.node[:]
    graph.node.extend(nodes)
    return model
