"""Shape and type rules of an op, as TensorRT asks for them — taken from its opset.py entry, never restated here.

TensorRT asks a plugin three questions at build time: the output dtypes for given input dtypes, the output shapes as
symbolic expressions of the input shapes, and (position by position) whether a dtype/format combination is supported.
These functions answer them over plain values (dtype names, tuples of dims), so the answers are unit-tested without
TensorRT; the plugin classes only translate TensorRT's objects to and from these values.
"""

from __future__ import annotations

from ..errors import MambaDeployError
from ..opset import INPUT_TYPE_CLASSES, OpEntry

# our dtype names <-> TensorRT DataType member names
TRT_DTYPES = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "int32": "INT32", "int64": "INT64",
              "bool": "BOOL", "int8": "INT8"}
FROM_TRT = {v: k for k, v in TRT_DTYPES.items()}


def trt_dtype(trt, name: str):
    return getattr(trt.DataType, TRT_DTYPES[name])


def dtype_name(trt_dtype_value) -> str:
    name = getattr(trt_dtype_value, "name", str(trt_dtype_value).split(".")[-1])
    if name not in FROM_TRT:
        raise MambaDeployError(f"TensorRT dtype {name} has no mambadeploy equivalent")
    return FROM_TRT[name]


def output_dtypes(entry: OpEntry, input_dtypes, attrs: dict | None = None) -> tuple[str, ...]:
    check_input_dtypes(entry, input_dtypes)
    return tuple(entry.dtype_rule(tuple(input_dtypes), attrs or {}))


def output_shapes(entry: OpEntry, input_shapes, attrs: dict | None = None) -> tuple[tuple, ...]:
    """Works on ints, strings (symbolic names) or TensorRT IDimensionExpr alike: the rule only picks and combines dims."""
    if len(input_shapes) != len(entry.inputs):
        raise MambaDeployError(f"op {entry.qualified_name} takes {len(entry.inputs)} inputs, got {len(input_shapes)}")
    shapes = tuple(tuple(s) for s in input_shapes)
    out = entry.shape_rule(shapes, attrs or {})
    if len(out) != len(entry.outputs):
        raise MambaDeployError(f"op {entry.qualified_name}: shape rule gave {len(out)} outputs, want {len(entry.outputs)}")
    return tuple(tuple(s) for s in out)


def check_input_dtypes(entry: OpEntry, input_dtypes) -> None:
    """Raise naming the first input whose dtype breaks the op's input type classes."""
    for pos in range(len(entry.inputs)):
        if not accepts(entry, pos, input_dtypes):
            cls = entry.input_types.get(entry.inputs[pos], "T")
            raise MambaDeployError(
                f"op {entry.qualified_name}: input {entry.inputs[pos]!r} has dtype {input_dtypes[pos]}, which type class "
                f"{cls!r} does not allow (allowed: {', '.join(INPUT_TYPE_CLASSES[cls])}"
                f"{'; and every T input of one node must share one dtype' if cls == 'T' else ''})"
            )


def accepts(entry: OpEntry, pos: int, dtypes) -> bool:
    """supports_format_combination for position `pos` (inputs first, then outputs), knowing dtypes[0..pos]."""
    n_in = len(entry.inputs)
    if pos < n_in:
        cls = entry.input_types.get(entry.inputs[pos], "T")
        if dtypes[pos] not in INPUT_TYPE_CLASSES[cls]:
            return False
        if cls == "T":
            earlier = [dtypes[i] for i in range(pos) if entry.input_types.get(entry.inputs[i], "T") == "T"]
            return not earlier or earlier[0] == dtypes[pos]
        return True
    want = entry.dtype_rule(tuple(dtypes[:n_in]), {})
    return dtypes[pos] == want[pos - n_in]
