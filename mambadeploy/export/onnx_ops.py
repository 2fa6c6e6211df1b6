"""The registry ops as ONNX nodes in domain `mambadeploy`: an ONNX schema per op (built from its opset.py entry, with a
type-and-shape inference function, so onnx.checker and shape inference understand the custom nodes) and the emitters the
torch exporter calls to turn each torch custom op (export/torch_ops.py) into one node.
"""

from __future__ import annotations

import functools

import onnx
import onnx.defs
from onnx import TensorProto

from .. import opset

ONNX_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16,
              "int32": TensorProto.INT32, "int64": TensorProto.INT64}
TYPE_NAMES = {v: k for k, v in ONNX_TYPES.items()}
_ATTR_TYPES = {"int": onnx.defs.OpSchema.AttrType.INT, "float": onnx.defs.OpSchema.AttrType.FLOAT,
               "string": onnx.defs.OpSchema.AttrType.STRING}


def _type_strings(type_class: str) -> list[str]:
    return [f"tensor({'float' if t == 'float32' else t})" for t in opset.INPUT_TYPE_CLASSES[type_class]]


def _schema(entry: opset.OpEntry) -> onnx.defs.OpSchema:
    P = onnx.defs.OpSchema.FormalParameter
    Opt = onnx.defs.OpSchema.FormalParameterOption
    optional = set(entry.optional_inputs)
    constraints, inputs = {}, []
    for name in entry.inputs:
        cls = entry.input_types[name]
        var = "T" if cls == "T" else f"T_{name}"  # every "T" input shares one dtype; other classes vary on their own
        constraints.setdefault(var, _type_strings(cls))
        inputs.append(P(name, var, "", param_option=Opt.Optional if name in optional else Opt.Single))
    outputs = []
    for name, dtype in zip(entry.outputs, entry.dtype_rule(["T"] * len(entry.inputs), {})):
        outputs.append(P(name, "T" if dtype == "T" else "tensor(float)"))
    schema = onnx.defs.OpSchema(
        entry.name, opset.DOMAIN, entry.version, doc=entry.doc, inputs=inputs, outputs=outputs,
        type_constraints=[(var, types, "") for var, types in constraints.items()],
        attributes=[onnx.defs.OpSchema.Attribute(name, _ATTR_TYPES[kind], "", required=False)
                    for name, (kind, _) in entry.attributes.items()],
    )
    schema.set_type_and_shape_inference_function(functools.partial(_infer, entry))
    return schema


def _infer(entry: opset.OpEntry, ctx) -> None:
    """Output dtypes from the entry's dtype rule, shapes from its shape rule (dims: int, symbol name, or None)."""
    shapes, dtypes = [], []
    for i in range(ctx.get_num_inputs()):
        t = ctx.get_input_type(i) if ctx.has_input(i) else None
        if t is None or not t.HasField("tensor_type"):
            shapes.append(None)
            dtypes.append(None)
            continue
        tt = t.tensor_type
        dtypes.append(TYPE_NAMES.get(tt.elem_type))
        shapes.append(tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
                      if tt.HasField("shape") else None)
    attrs = {}
    for name in entry.attributes:
        a = ctx.get_attribute(name)
        if a is not None:
            attrs[name] = onnx.helper.get_attribute_value(a)
    out_dtypes = entry.dtype_rule(dtypes, attrs)
    try:
        out_shapes = entry.shape_rule(shapes, attrs)
    except (TypeError, IndexError):  # an input without a known shape: give the dtype alone
        out_shapes = [None] * len(entry.outputs)
    for i in range(min(ctx.get_num_outputs(), len(entry.outputs))):
        out = onnx.TypeProto()
        out.tensor_type.elem_type = ONNX_TYPES[out_dtypes[i]]
        if out_shapes[i] is not None:
            out.tensor_type.shape.SetInParent()
            for d in out_shapes[i]:
                dim = out.tensor_type.shape.dim.add()
                if isinstance(d, int):
                    dim.dim_value = d
                elif d:
                    dim.dim_param = d
        ctx.set_output_type(i, out)


@functools.cache
def register_schemas() -> None:
    """Make onnx (checker, shape inference, onnxscript) know the mambadeploy ops; idempotent."""
    for entry in opset.REGISTRY.values():
        try:
            onnx.defs.get_schema(entry.name, entry.version, opset.DOMAIN)
            continue  # registered by an earlier import in this process
        except onnx.defs.SchemaError:
            pass
        onnx.defs.register_schema(_schema(entry))


# --------------------------------------------------------------------------- emitters (torch custom op -> one node)
@functools.cache
def _domain():
    import onnxscript

    register_schemas()
    return onnxscript.values.Opset(opset.DOMAIN, opset.OPSET_VERSION)


def emit_selective_scan(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus: int):
    return _domain().SelectiveScan(u, delta, A, B, C, D, z, delta_bias, initial_state,
                                   delta_softplus=int(delta_softplus), _outputs=2)


def emit_causal_conv1d(x, weight, bias, initial_state, activation: int):
    return _domain().CausalConv1d(x, weight, bias, initial_state, activation=int(activation), _outputs=2)


def emit_expert_gather(x, w1, w2, experts, weights, activation: int, top_k: int):
    return _domain().TopKExpertGather(x, w1, w2, experts, weights, activation=int(activation), top_k=int(top_k))


def emit_conv_update(x, conv_state, weight, bias, activation: int):
    return _domain().CausalConv1dUpdate(x, conv_state, weight, bias, activation=int(activation), _outputs=2)


def emit_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus: int):
    return _domain().SelectiveStateUpdate(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=int(dt_softplus),
                                          _outputs=2)


def emit_add_rms_norm(x, residual, weight, epsilon: float):
    return _domain().AddRMSNorm(x, residual, weight, epsilon=float(epsilon), _outputs=2)


def emit_routed_moe(x, router_weight, router_bias, w1, w2, router: int, top_k: int, activation: int):
    return _domain().RoutedMoE(x, router_weight, router_bias, w1, w2, router=int(router), top_k=int(top_k),
                               activation=int(activation))


def emit_decode_attention(q, k, v, key_cache, value_cache, pos, scale: float):
    return _domain().DecodeAttention(q, k, v, key_cache, value_cache, pos, scale=float(scale), _outputs=3)



def emit_sparse_linear(x, weight, bias, mode: float, threshold: float):
    return _domain().SparseLinear(x, weight, bias, mode=float(mode), threshold=float(threshold))

def translation_table() -> dict:
    """torch custom op -> the registry entry's emitter, for torch.onnx.export(custom_translation_table=...)."""
    import torch

    from .torch_ops import REGISTRY_NAMES

    return {getattr(torch.ops.mambadeploy, op).default: opset.get_op(name).resolve("onnx_emitter")
            for op, name in REGISTRY_NAMES.items()}
