"""The op registry is the one join key: every link of every entry resolves through the entry, the torch custom ops and
the C++ kernels take their names, signatures, attribute defaults and shape checks from it, and the kernels each
runtime's AOT path compiles are the ones the entry names."""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import pytest
import torch

from mambadeploy import opset
from mambadeploy.plugins.ort import gen_opset

ENTRIES = list(opset.REGISTRY.values())
LINKS = ("reference", "triton", "onnx_emitter", "portable", "ort", "trt", "trt_qdp", "trt_adapter", "standard")
ORT_SOURCES = sorted((Path(gen_opset.__file__).parent).glob("ops_*.cc"))


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_every_link_resolves(entry):
    linked = [p for p in LINKS if p == "reference" or p in entry.links]
    required = {"reference", "triton", "onnx_emitter", "portable", "ort", "trt", "trt_adapter"}
    if entry.name == "RoutedMoE":  # torch-fast runs it as two launchers (moe_routing.route_hidden + expert_gather)
        required.remove("triton")
    assert required <= set(linked)
    assert set(entry.links) <= set(LINKS), f"unknown link kinds {set(entry.links) - set(LINKS)}"
    for piece in linked:
        assert callable(entry.resolve(piece)), f"{entry.name}.{piece}"
    for runtime in ("trt", "ort_cuda"):
        for kernel in entry.resolve_kernels(runtime):
            assert type(kernel).__name__ == "JITFunction", f"{entry.name} {runtime}: {kernel} is no Triton kernel"


def test_unknown_piece_and_duplicate_name_fail():
    with pytest.raises(opset.MambaDeployError, match="no 'nope' implementation"):
        opset.get_op("SelectiveScan").resolve("nope")
    with pytest.raises(opset.MambaDeployError, match="registered twice"):
        opset.register(opset.get_op("AddRMSNorm"))


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_torch_op_signature_is_the_entry(entry):
    """torch.ops.mambadeploy.<torch_op> takes the entry's inputs (optional ones as Tensor?) then its attributes."""
    from mambadeploy.export import torch_ops

    assert torch_ops.REGISTRY_NAMES[entry.torch_op] == entry.name
    schema = getattr(torch.ops.mambadeploy, entry.torch_op).default._schema
    names = [a.name for a in schema.arguments]
    assert names == [*entry.inputs, *entry.attributes]
    for arg in schema.arguments[:len(entry.inputs)]:
        assert ("Optional" in str(arg.type)) == (arg.name in entry.optional_inputs), arg
    assert len(schema.returns) == len(entry.outputs)


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_dtype_rule_follows_node_dtypes(entry):
    dtypes = tuple({"T": "bfloat16", "F32": "float32", "I64": "int64"}[c] for c in entry.node_dtypes.values())
    want = tuple("bfloat16" if c == "T" else "float32" for c in entry.output_dtypes)
    assert entry.dtype_rule(dtypes, {}) == want


def test_committed_header_is_fresh():
    """plugins/ort/opset_generated.h is what gen_opset writes from the registry today."""
    assert gen_opset.HEADER.read_text() == gen_opset.render(), \
        "stale: run python -m mambadeploy.plugins.ort.gen_opset"
    text = gen_opset.HEADER.read_text()
    for entry in ENTRIES:
        ins, outs = gen_opset.signature(entry)
        assert f'kInputs = "{ins}"' in text and f'kOutputs = "{outs}"' in text
        assert len(ins) == len(entry.inputs) and sum(c.islower() for c in ins) == len(entry.optional_inputs)


def _concrete(entry, sizes):
    """Concrete input shapes for an entry's symbolic ones; a variadic dim stands for two leading dims (2, rows / 2)."""
    from mambadeploy.op_shapes import parse_dim

    shapes = []
    for name in entry.inputs:
        shape = []
        for dim in entry.shapes[name]:
            variadic, factor, sym = parse_dim(dim)
            shape += [2, sizes[sym] // 2] if variadic else [factor * sizes[sym]]
        shapes.append(tuple(shape))
    return shapes


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_symbolic_shapes_resolve_and_match_the_reference(entry):
    """Every op's shapes resolve from its inputs (every dim bound by a required input, with the optional ones absent
    too); the reference, run on those shapes, returns what the shape rule says; a dim that disagrees is refused."""
    sizes = {name: 2 * (3 + i) for i, name in enumerate(entry.dim_names())}  # distinct, even (rows = 2 x half)
    if "k" in sizes:
        sizes["k"] = 2  # top-k of E experts
    if "KV" in sizes:
        sizes["KV"], sizes["H"] = 2, 6  # KV heads divide the query heads
    shapes = _concrete(entry, sizes)
    assert entry.resolve_shapes(shapes) == sizes
    absent = [None if n in entry.optional_inputs else s for n, s in zip(entry.inputs, shapes)]
    assert entry.resolve_shapes(absent) == sizes
    g = torch.Generator().manual_seed(0)
    tensors = []
    for name, shape, cls in zip(entry.inputs, shapes, entry.node_dtypes.values()):
        if cls == "I64":
            tensors.append(torch.randint(0, sizes.get("E", 1), shape, generator=g))  # pos (no E): slot 0
        else:
            tensors.append(-torch.rand(shape, generator=g) if name == "A" else torch.randn(shape, generator=g))
    from mambadeploy.export import torch_ops  # noqa: F401 - registers torch.ops.mambadeploy.*

    attrs = entry.check_attributes({"top_k": 2} if "top_k" in entry.attributes else {})
    if entry.name == "RoutedMoE":
        attrs["router"] = opset.ROUTER_CODES["softmax_topk"]
    out = getattr(torch.ops.mambadeploy, entry.torch_op)(*tensors, *attrs.values())
    out = out if isinstance(out, (tuple, list)) else (out,)
    assert [tuple(o.shape) for o in out] == list(entry.shape_rule(shapes, attrs))
    for i in range(len(entry.inputs)):  # one input's dims all doubled: it, or a later input, disagrees
        bad = list(shapes)
        bad[i] = tuple(2 * v for v in shapes[i])
        with pytest.raises(opset.MambaDeployError, match=rf"op {entry.name}: input \w+ has shape"):
            entry.resolve_shapes(bad)


def test_shapes_declaration_is_checked():
    """A dim no required input carries, or a variadic dim not first, is refused when the entry is made."""
    from dataclasses import replace

    scan = opset.get_op("SelectiveScan")
    with pytest.raises(opset.MambaDeployError, match="carried by no required input"):
        replace(scan, shapes={**scan.shapes, "D": ("Q",)})
    with pytest.raises(opset.MambaDeployError, match="must come first"):
        replace(scan, shapes={**scan.shapes, "u": ("b", "*d", "L")})
    assert opset.get_op("SelectiveScan").zero_fill("initial_state") == [("u", 0, 2), ("A", 1, 2)]
    assert opset.get_op("SelectiveScan").zero_fill("z") is None  # absent gate: no zero equivalent


def test_header_states_every_shape():
    text = gen_opset.HEADER.read_text()
    for entry in ENTRIES:
        shapes = ", ".join(f'"{" ".join(entry.shapes[n])}"' for n in entry.inputs)
        assert f"kInputShapes[] = {{{shapes}}};" in text
        assert f"struct Dims {{ int64_t {', '.join(entry.dim_names())}; }};" in text


def test_signature_letters():
    assert gen_opset.signature(opset.get_op("SelectiveScan")) == ("TTFTTtttf", "TF")
    assert gen_opset.signature(opset.get_op("TopKExpertGather")) == ("TTTIF", "T")


@pytest.mark.parametrize("source", ORT_SOURCES, ids=lambda p: p.name)
def test_ort_sources_restate_no_op_name_or_attribute_default(source):
    """The C++ op classes take names, signatures and attribute defaults from opset_generated.h, not from literals."""
    text = source.read_text()
    names = "|".join(e.name for e in ENTRIES)
    assert not re.search(rf'"({names})"', text), "op name as a string literal: use the generated Spec::kName"
    assert not re.search(r'Attr(Float)?Or\(info, "', text), "attribute read by name: use Attr(info, Spec::attr)"
    assert "GetInputTypeCount" not in text, "signature written by hand: use mambadeploy_ort::RegistryOp"
    assert not re.search(r"Check\w+Shapes\(", text), "a shape rule written by hand: use CheckInputShapes<Spec>"


# --------------------------------------------------------------------------- the kernels each AOT path compiles
def _kernel_bodies(adapter) -> set:
    """The @triton.jit kernels of mambadeploy/kernels/ an adapter calls; the adapter itself when it calls none."""
    tree = ast.parse(textwrap.dedent(adapter.src))
    scope = adapter.fn.__globals__
    called = {scope.get(n.func.id) for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    kernels = {k for k in called if type(k).__name__ == "JITFunction" and k.fn.__name__.endswith("_kernel")
               and k.fn.__module__.startswith("mambadeploy.kernels.")}  # not the shared helpers (fsum, activate...)
    return kernels or {adapter}


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_trt_plugin_runs_the_kernel_the_entry_names(entry):
    from mambadeploy.plugins import aot, aot_kernels

    adapter = entry.resolve("trt_adapter")
    if entry.name in aot.MULTI_LAUNCH:  # several launches: the entry links one of them, names the kernels of all
        adapters = [getattr(aot_kernels, a) for a in aot.multi_launch(entry.name).ADAPTERS]
        assert adapter in adapters
        assert set(entry.resolve_kernels("trt")) == set().union(*(_kernel_bodies(a) for a in adapters))
        return
    assert getattr(aot_kernels, aot.spec_for(entry.name).adapter) is adapter  # aot.py compiles the entry's adapter
    assert _kernel_bodies(adapter) == set(entry.resolve_kernels("trt"))


def _ort_aot_specs(name: str):
    from mambadeploy.plugins.ort import aot_table

    if name == "SelectiveScan":
        return aot_table.scan_specs("bfloat16", 16, D=True, z=True, bias=True, h0=True, softplus=True)
    if name == "CausalConv1d":
        return aot_table.conv_specs("bfloat16", 4, bias=True, init=True, silu=True)
    if name in ("TopKExpertGather", "RoutedMoE"):
        return aot_table.moe_specs("bfloat16", 64, 128, 8, 2, 0, experts_int64=name == "TopKExpertGather")
    if name == "DecodeAttention":
        return aot_table.attention_specs("bfloat16", 4, 128)
    return []  # the decode ops run the library's hand-written CUDA kernels


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_ort_aot_table_compiles_the_kernels_the_entry_names(entry):
    from mambadeploy.plugins.ort import triton_adapters

    bodies = set()
    for spec in _ort_aot_specs(entry.name):
        bodies |= _kernel_bodies(getattr(triton_adapters, spec.adapter))
    assert bodies == set(entry.resolve_kernels("ort_cuda"))


def test_scan_runtimes_differ_as_documented():
    """SelectiveScan's TensorRT plugin runs the single-launch scan; torch-fast and ORT CUDA the segment-parallel one."""
    scan = opset.get_op("SelectiveScan")
    trt, ort = scan.resolve_kernels("trt"), scan.resolve_kernels("ort_cuda")
    assert [k.fn.__name__ for k in trt] == ["selective_scan_kernel"]
    assert {k.fn.__name__ for k in ort} == {"selective_scan_seg_kernel", "selective_scan_fold_kernel"}


# --------------------------------------------------------------------------- the tensorrt.plugin descriptions
class _FakeTrtp:
    """The few pieces of tensorrt.plugin that the generated descriptions touch (TensorRT is not installable here)."""

    class TensorDesc:
        def __init__(self, shape_expr, dtype):
            self.shape_expr, self.dtype = shape_expr, dtype

    class ShapeExprs:
        from_tuple = staticmethod(tuple)

    @staticmethod
    def from_shape_expr(shape_expr, dtype):
        return _FakeTrtp.TensorDesc(shape_expr, dtype)


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_trt_qdp_functions_are_the_entry(entry):
    """tensorrt.plugin reads the plugin's inputs and attributes off these signatures: they must be the entry's."""
    import inspect
    from types import SimpleNamespace

    from mambadeploy.plugins import trt_qdp

    trt = SimpleNamespace(float32="float32")
    describe, aot_impl = trt_qdp.qdp_functions(trt, _FakeTrtp, entry)
    params = inspect.signature(describe).parameters
    assert list(params) == [*entry.inputs, *entry.attributes]
    assert all(params[n].annotation is _FakeTrtp.TensorDesc for n in entry.inputs)
    assert [params[a].annotation.__name__ for a in entry.attributes] == [k for k, _ in entry.attributes.values()]
    assert list(inspect.signature(aot_impl).parameters) == [*entry.inputs, *entry.attributes, "outputs", "tactic"]

    shapes = [tuple(f"{name}{i}" for i in range(3)) for name in entry.inputs]  # symbolic dims
    descs = [_FakeTrtp.TensorDesc(s, "bf16" if c == "T" else c) for s, c in zip(shapes, entry.node_dtypes.values())]
    attrs = {a: default for a, (_, default) in entry.attributes.items()}
    out = describe(*descs, **attrs)
    out = out if isinstance(out, tuple) else (out,)
    assert [o.shape_expr for o in out] == [tuple(s) for s in entry.shape_rule(tuple(shapes), attrs)]
    assert [o.dtype for o in out] == ["bf16" if c == "T" else "float32" for c in entry.output_dtypes]


def test_build_refuses_a_stale_header(monkeypatch):
    from mambadeploy.plugins.ort import build

    monkeypatch.setattr(gen_opset, "render", lambda: "// not what is committed\n")
    with pytest.raises(opset.MambaDeployError, match="gen_opset"):
        build.build_library()
