"""Attribute packing: an op's attributes (opset.py) <-> TensorRT plugin fields.

The ONNX parser turns each node attribute into a plugin field (int -> INT32 array of 1, float -> FLOAT32, ints -> INT32
array); the plugin serializes the same fields into the plan with get_fields_to_serialize, and the creator reads them back
when the plan is deserialized. Both directions go through here, in plain numpy, so they are unit-tested without
TensorRT; `to_trt_fields` / `field_kind` are the only TensorRT-facing lines.
"""

from __future__ import annotations

import numpy as np

from ..errors import MambaDeployError
from ..opset import OpEntry

# opset attribute type -> (numpy dtype, TensorRT PluginFieldType member name)
KINDS = {
    "int": (np.int32, "INT32"),
    "float": (np.float32, "FLOAT32"),
    "ints": (np.int32, "INT32"),
    "floats": (np.float32, "FLOAT32"),
}
# attributes the ONNX parser uses to find the plugin; they never reach the plugin as data
ROUTING_ATTRIBUTES = ("plugin_version", "plugin_namespace")


def pack(entry: OpEntry, attrs: dict) -> list[tuple[str, np.ndarray]]:
    """Complete attributes (defaults filled, unknown names refused) -> [(name, 1-d numpy array)] in declaration order."""
    full = entry.check_attributes(attrs)
    fields = []
    for name, (kind, _) in entry.attributes.items():
        if kind not in KINDS:
            raise MambaDeployError(f"op {entry.qualified_name}: attribute {name!r} has type {kind!r}, not packable")
        value = full[name]
        wide = np.atleast_1d(np.asarray(value, dtype=np.float64 if kind.startswith("float") else np.int64))
        if kind in ("int", "float") and wide.size != 1:
            raise MambaDeployError(f"op {entry.qualified_name}: attribute {name!r} must be one {kind}, got {value!r}")
        if kind.startswith("int") and (np.abs(wide) > np.iinfo(np.int32).max).any():
            raise MambaDeployError(f"op {entry.qualified_name}: attribute {name!r}={value!r} does not fit int32")
        array = wide.astype(KINDS[kind][0])
        fields.append((name, array))
    return fields


def unpack(entry: OpEntry, fields) -> dict:
    """[(name, array-like)] as TensorRT hands them to a creator -> the op's attribute dict (defaults filled)."""
    attrs = {}
    for name, data in fields:
        if name in ROUTING_ATTRIBUTES:
            continue
        if name not in entry.attributes:
            raise MambaDeployError(
                f"op {entry.qualified_name}: unknown plugin field {name!r} (known: {', '.join(entry.attributes)}); the "
                "graph was exported by another mambadeploy version: re-export it"
            )
        kind = entry.attributes[name][0]
        array = np.asarray(data).reshape(-1)
        if kind in ("int", "float"):
            if array.size != 1:
                raise MambaDeployError(f"op {entry.qualified_name}: plugin field {name!r} holds {array.size} values, want 1")
            attrs[name] = int(array[0]) if kind == "int" else float(array[0])
        else:
            attrs[name] = [int(v) for v in array] if kind == "ints" else [float(v) for v in array]
    return entry.check_attributes(attrs)


def field_kind(trt, entry: OpEntry, name: str):
    return getattr(trt.PluginFieldType, KINDS[entry.attributes[name][0]][1])


def to_trt_fields(trt, entry: OpEntry, attrs: dict):
    """A PluginFieldCollection holding the packed attributes (for get_fields_to_serialize)."""
    return trt.PluginFieldCollection(
        [trt.PluginField(name, array, field_kind(trt, entry, name)) for name, array in pack(entry, attrs)]
    )


def field_names(trt, entry: OpEntry):
    """The creator's declared fields (empty arrays: names and kinds only)."""
    return trt.PluginFieldCollection(
        [trt.PluginField(name, np.array([], dtype=KINDS[kind][0]), field_kind(trt, entry, name))
         for name, (kind, _) in entry.attributes.items()]
    )
