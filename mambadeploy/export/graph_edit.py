"""Small helpers to rewrite an ONNX graph in place: emit nodes with unique names, read value types, replace a node by
a list of nodes. Works on a ModelProto loaded without its external data (initializers are only referenced)."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INT64_MAX = np.iinfo(np.int64).max


class NodeEmitter:
    """Collects the nodes replacing one node; value names are `<prefix>/<n>` so they never clash with the graph's."""

    _ids = itertools.count()

    def __init__(self, prefix: str):
        self.prefix = f"{prefix}#{next(self._ids)}"
        self.nodes: list[onnx.NodeProto] = []
        self._n = itertools.count()

    def fresh(self, hint: str = "v") -> str:
        return f"{self.prefix}/{hint}{next(self._n)}"

    def op(self, op_type: str, inputs, outputs=1, domain: str = "", **attrs):
        """Append a node; `outputs` is a count (fresh names) or a list of names. Returns one name or a list."""
        names = [self.fresh(op_type) for _ in range(outputs)] if isinstance(outputs, int) else list(outputs)
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self.fresh(op_type + "_node"),
                                           domain=domain, **attrs))
        return names[0] if len(names) == 1 else names

    def const(self, values, dtype=np.int64) -> str:
        return self.op("Constant", [], value=numpy_helper.from_array(np.asarray(values, dtype=dtype),
                                                                      name=self.fresh("const")))

    def cast(self, name: str, from_type: int, to_type: int = TensorProto.FLOAT) -> str:
        return name if from_type == to_type else self.op("Cast", [name], to=to_type)

    def dims(self, shape_of: str, start: int, end: int) -> str:
        """Shape(x)[start:end] as an int64 vector."""
        return self.op("Shape", [shape_of], start=start, end=end)


class GraphTypes:
    """elem_type and static shape of every named value of a graph (after shape inference)."""

    def __init__(self, model: onnx.ModelProto):
        self.types: dict[str, int] = {}
        self.shapes: dict[str, tuple] = {}
        g = model.graph
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            tt = vi.type.tensor_type
            self.types[vi.name] = tt.elem_type
            if tt.HasField("shape"):
                self.shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim)
        for init in g.initializer:
            self.types[init.name] = init.data_type
            self.shapes[init.name] = tuple(init.dims)

    def elem_type(self, name: str) -> int:
        if name not in self.types:
            raise KeyError(f"no type known for value {name!r} (run shape inference first)")
        return self.types[name]

    def static_dim(self, name: str, axis: int) -> int:
        d = self.shapes.get(name, ())[axis]
        if not isinstance(d, int) or d <= 0:
            raise ValueError(f"value {name!r} has no static size on axis {axis}")
        return d


def replace_nodes(model: onnx.ModelProto, replacements: dict[int, list[onnx.NodeProto]]) -> None:
    """Replace graph nodes (by index) with node lists, keeping topological order."""
    old = list(model.graph.node)
    del model.graph.node[:]
    for i, node in enumerate(old):
        model.graph.node.extend(replacements.get(i, [node]))


def drop_unused_opset(model: onnx.ModelProto, domain: str) -> None:
    if not any(n.domain == domain for n in model.graph.node):
        keep = [o for o in model.opset_import if o.domain != domain]
        del model.opset_import[:]
        model.opset_import.extend(keep)
