"""Graph preparation for TensorRT: fill our nodes' omitted optional inputs with explicit zeros.

TensorRT's ONNX parser hands a plugin node's omitted optional input ("" in ONNX) to addPluginV3 as a null tensor, which
it refuses ("Parameter check failed, condition: (input) != nullptr" — seen with TensorRT-RTX 1.7). The registry's optional
inputs all have a zero default that means "absent" in the reference (no D skip, no delta bias, no conv bias, a zero
initial state), so each omitted one becomes a ConstantOfShape of zeros (fp32, allowed for every optional input's type
class) shaped from the node's required inputs: which dims come from where follows from the entry's symbolic shapes
(OpEntry.zero_fill). The exceptions are the entry's `absence_not_zeros`, the gate `z` (SelectiveScan,
SelectiveStateUpdate), whose absence has no zero equivalent: such a node is refused with the reason.
Only the graph structure changes; external weight files are not read (the parser reads them from the original path).
"""

from __future__ import annotations

from ..errors import MambaDeployError
from ..opset import DOMAIN, get_op


def fill_optional_inputs(model) -> list[str]:
    """Rewrite `model` (onnx.ModelProto, in place). Returns one line per filled input, for the build log."""
    from onnx import TensorProto, helper

    changes = []
    new_nodes = []
    for node in model.graph.node:
        if node.domain != DOMAIN:
            new_nodes.append(node)
            continue
        entry = get_op(node.op_type)
        inputs = list(node.input) + [""] * (len(entry.inputs) - len(node.input))
        for pos, name in enumerate(entry.inputs):
            if inputs[pos]:
                continue
            recipe = entry.zero_fill(name)  # slices of the required inputs' shapes, from the entry's symbolic shapes
            if recipe is None:
                raise MambaDeployError(
                    f"node {node.name or node.op_type} omits input {name!r} of {entry.qualified_name}, which TensorRT "
                    "plugins cannot take as absent and which has no zero equivalent; export it with that input present"
                )
            prefix = f"{node.name or node.op_type}.{name}.zeros"
            parts = []
            for k, (src, start, end) in enumerate(recipe):
                src_name = inputs[entry.inputs.index(src)]
                if not src_name:
                    raise MambaDeployError(f"node {node.name}: cannot shape zeros for {name!r}: {src!r} is absent too")
                new_nodes.append(helper.make_node("Shape", [src_name], [f"{prefix}.shape{k}"], start=start, end=end,
                                                  name=f"{prefix}.shape{k}"))
                parts.append(f"{prefix}.shape{k}")
            shape = parts[0]
            if len(parts) > 1:
                shape = f"{prefix}.dims"
                new_nodes.append(helper.make_node("Concat", parts, [shape], axis=0, name=shape))
            new_nodes.append(helper.make_node(
                "ConstantOfShape", [shape], [prefix], name=prefix,
                value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])))
            inputs[pos] = prefix
            changes.append(f"{node.name or node.op_type}: omitted {name!r} -> zeros shaped like "
                           + " + ".join(f"{s}[{a}:{b}]" for s, a, b in recipe))
        del node.input[:]
        node.input.extend(inputs)
        new_nodes.append(node)
    if changes:
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
        _ensure_opset_for_shape_slices(model)
    return changes


def _ensure_opset_for_shape_slices(model) -> None:
    """Shape's start/end attributes need default-domain opset >= 15."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version < 15:
            raise MambaDeployError(f"the graph uses ONNX opset {imp.version}; TensorRT preparation needs >= 15: re-export")
