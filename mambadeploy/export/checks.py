"""Structural checks every exported graph passes: onnx.checker (full check, with the custom and contrib schemas
registered so their nodes are type-checked too) and shape inference giving every graph output a dtype and a full shape."""

from __future__ import annotations

from pathlib import Path

import onnx

from ..errors import MambaDeployError
from .onnx_ops import TYPE_NAMES


def check_graph(path: Path) -> onnx.ModelProto:
    """Check one saved graph; return its (shape-inferred) proto without external data."""
    from . import contrib, onnx_ops

    onnx_ops.register_schemas()
    contrib.register_schemas()
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise MambaDeployError(f"{path.name}: fails onnx.checker: {exc}") from exc
    proto = onnx.load(str(path), load_external_data=False)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError as exc:
        if "external tensors" not in str(exc):
            raise
        # a big constant (an arange over a 256K-slot cache) went to the external data file, which data propagation
        # cannot read without loading every weight: infer without it (the outputs' shapes are still required below)
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=False)
    for out in inferred.graph.output:
        tt = out.type.tensor_type
        dims_known = tt.HasField("shape") and all(d.HasField("dim_value") or d.dim_param for d in tt.shape.dim)
        if tt.elem_type not in TYPE_NAMES or not dims_known:
            raise MambaDeployError(f"{path.name}: shape inference leaves output {out.name!r} without a full "
                                   f"shape/dtype ({tt})")
    return inferred


def tensor_specs(values) -> list[dict]:
    """[{name, shape, dtype}] of graph inputs/outputs (dims: int or symbol name)."""
    specs = []
    for v in values:
        tt = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim]
        specs.append({"name": v.name, "shape": shape, "dtype": TYPE_NAMES.get(tt.elem_type, str(tt.elem_type))})
    return specs
