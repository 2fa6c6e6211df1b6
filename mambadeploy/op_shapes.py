"""Symbolic shapes of the registry's ops (opset.py): each input and output is a tuple of named dims, and everything
that needs an op's shapes derives them from that one statement: the ONNX / TensorRT output shape rule, the check of
concrete input shapes (here, and in C++ through the header gen_opset.py writes), and the zeros TensorRT preparation
puts in place of an omitted optional input (plugins/trt_graph.py).

A dim is written `name` (a size), `2F` (twice the size F: an integer factor before the name) or, first in a shape only,
`*rows` (any number of leading dims, equal across the inputs that carry it; its size is their product). A name is bound
by the first present input that carries it, in input order; every later occurrence must agree.
"""

from __future__ import annotations

import math
import re

from .errors import MambaDeployError

_DIM = re.compile(r"^(\*?)(\d*)([A-Za-z_]\w*)$")


def parse_dim(dim: str) -> tuple[bool, int, str]:
    """'b' -> (False, 1, 'b'); '2F' -> (False, 2, 'F'); '*rows' -> (True, 1, 'rows')."""
    m = _DIM.match(dim)
    if not m or (m.group(1) and m.group(2)):
        raise MambaDeployError(f"bad symbolic dim {dim!r}: write a name, a factor and a name (2F), or *name first")
    return bool(m.group(1)), int(m.group(2) or 1), m.group(3)


def dim_names(shapes: dict, inputs: tuple) -> tuple[str, ...]:
    """The dim names an op's inputs carry, in order of first appearance (the C++ Dims struct's field order)."""
    names: list[str] = []
    for name in inputs:
        for dim in shapes[name]:
            sym = parse_dim(dim)[2]
            if sym not in names:
                names.append(sym)
    return tuple(names)


def check_declaration(op: str, shapes: dict, inputs: tuple, outputs: tuple, optional: tuple) -> None:
    """Every input and output has a shape; each dim parses; a variadic dim only comes first; every dim of an optional
    input or an output is bound by a required input (so the shapes resolve whatever optional inputs are present)."""
    if list(shapes) != [*inputs, *outputs]:
        raise MambaDeployError(f"op {op}: shapes must give every input then every output, in order")
    required = {parse_dim(d)[2] for n in inputs if n not in optional for d in shapes[n]}
    for name, dims in shapes.items():
        for i, dim in enumerate(dims):
            variadic, factor, sym = parse_dim(dim)
            if variadic and i:
                raise MambaDeployError(f"op {op}: {name}: the variadic dim {dim!r} must come first")
            if (name in optional or name in outputs) and sym not in required:
                raise MambaDeployError(f"op {op}: {name}'s dim {sym!r} is carried by no required input")
            if name in outputs and factor != 1:
                raise MambaDeployError(f"op {op}: output {name}'s dims must be plain names")


def resolve(op: str, shapes: dict, inputs: tuple, concrete: list) -> dict:
    """Bind the dims from concrete input shapes (None: an absent optional input). Returns {name: size} (a variadic dim:
    the product of its dims). Raises naming the first input whose shape breaks the declaration."""
    sizes: dict = {}
    lead: dict = {}  # variadic name -> the leading dims it stands for
    for name, shape in zip(inputs, concrete):
        if shape is None:
            continue
        shape = tuple(int(s) for s in shape)
        dims = [parse_dim(d) for d in shapes[name]]
        fixed = [d for d in dims if not d[0]]
        n_lead = len(shape) - len(fixed) if dims and dims[0][0] else 0
        want = ", ".join(shapes[name])
        if n_lead < 0 or len(shape) != n_lead + len(fixed):
            raise MambaDeployError(f"op {op}: input {name} has shape {list(shape)}, not ({want})")
        if dims and dims[0][0]:
            sym, seq = dims[0][2], shape[:n_lead]
            if lead.setdefault(sym, seq) != seq:
                raise MambaDeployError(f"op {op}: input {name} has shape {list(shape)}, not ({want}) with {sym} = "
                                       f"{' x '.join(map(str, lead[sym]))}")
            sizes[sym] = math.prod(seq)
        for (_, factor, sym), size in zip(fixed, shape[n_lead:]):
            if sym not in sizes and size % factor == 0:
                sizes[sym] = size // factor
            if sizes.get(sym, -1) * factor != size:
                bound = ", ".join(f"{k}={v}" for k, v in sizes.items())
                raise MambaDeployError(f"op {op}: input {name} has shape {list(shape)}, not ({want}) with {bound}")
    return sizes


def output_rule(shapes: dict, inputs: tuple, outputs: tuple, optional: tuple):
    """The output shape rule (input shapes of ints, names or TensorRT IDimensionExpr -> output shapes): an output
    declared like a required input copies that input's shape; otherwise each dim comes from the first required input
    carrying it. The rule only picks dims, so it works on symbolic dims alike."""
    required = [n for n in inputs if n not in optional]
    plan = []
    for out in outputs:
        same = next((n for n in required if shapes[n] == shapes[out]), None)
        if same is not None:
            plan.append(("copy", inputs.index(same)))
            continue
        picks = []
        for dim in shapes[out]:
            src = next(n for n in required if dim in shapes[n])
            picks.append((inputs.index(src), shapes[src].index(dim)))
        plan.append(("pick", picks))

    def rule(input_shapes, attrs=None):
        return tuple(tuple(input_shapes[how]) if kind == "copy" else tuple(input_shapes[i][j] for i, j in how)
                     for kind, how in plan)

    return rule


def zero_fill_recipe(shapes: dict, inputs: tuple, optional: tuple, name: str) -> list[tuple[str, int, int]]:
    """How to shape zeros for the omitted optional input `name`: [(required input, start, end)] slices of their shapes,
    concatenated (consecutive dims of one input merged into one slice)."""
    required = [n for n in inputs if n not in optional]
    recipe: list = []
    for dim in shapes[name]:
        variadic, factor, _ = parse_dim(dim)
        if variadic or factor != 1:
            raise MambaDeployError(f"input {name}: zeros cannot be shaped from the dim {dim!r}")
        src = next(n for n in required if dim in shapes[n])
        at = shapes[src].index(dim)
        if recipe and recipe[-1][0] == src and recipe[-1][2] == at:
            recipe[-1] = (src, recipe[-1][1], at + 1)
        else:
            recipe.append((src, at, at + 1))
    return recipe
