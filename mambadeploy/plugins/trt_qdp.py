"""The ops as `tensorrt.plugin` (TensorRT >= 10.6) descriptions for full TensorRT: a shape/type description per op and,
where an AOT kernel exists (aot.SPECS), an `aot_impl` returning the Triton-compiled PTX, its kernel name, launch
parameters and int32 scalar arguments — so the engine runs under trtexec or C++ with no Python.

Importable without TensorRT: nothing from tensorrt is imported until `register_qdp()` runs. It CANNOT run here (full
TensorRT is not installable on these machines); the pieces it delegates to — shape/dtype rules (trt_rules), the AOT
compile and the grid/scalar formulas (aot) — are the ones tests exercise, the latter on the H100 via CuPy.

Why the functions are generated (qdp_functions): tensorrt.plugin reads each function's parameter names and type hints to
derive the plugin's inputs and attributes, so the hints must be real `trtp` classes, which exist only after import, and
the parameters are the op's registry entry (inputs, then attributes), written nowhere else."""

from __future__ import annotations

from ..errors import lazy_import
from ..opset import REGISTRY, OpEntry
from . import aot, trt_rules

# representative sizes for dynamic dims when picking constexprs at build time (the launch_config only uses them to size
# blocks for occupancy; any value gives correct results)
REPRESENTATIVE_DYNAMIC_DIM = {0: 1, 2: 128}  # axis -> value: batch 1, length 128


def _concrete(shape_expr) -> tuple:
    dims = []
    for axis, e in enumerate(shape_expr):
        dims.append(e.constant_value() if e.is_constant else REPRESENTATIVE_DYNAMIC_DIM.get(axis, 1))
    return tuple(dims)


def _aot_result(trt, trtp, op: str, descs, attrs: dict):
    """(kernel name, PTX, KernelLaunchParams, SymIntExprs) for TensorRT, from the shared AOT pieces."""
    import torch

    spec = aot.spec_for(op)
    dtypes = [trt_rules.dtype_name(d.dtype) for d in descs]
    major, minor = torch.cuda.get_device_capability()
    compiled, choice, params, ptx = aot.compile_kernel(op, dtypes, attrs, [_concrete(d.shape_expr) for d in descs],
                                                  arch=major * 10 + minor)
    if any(p.startswith("implicit") for p in params):
        # TensorRT passes inputs, extra args, outputs: a kernel with more parameters cannot be launched by it
        raise RuntimeError(f"{op}: the kernel reads Triton's implicit parameters {params}, which TensorRT does not "
                           "pass to AOT kernels; use the IPluginV3 route (trt_v3) for this op")
    shapes = [d.shape_expr for d in descs]
    gx, gy, gz = spec.grid(shapes, choice["constexprs"])
    launch = trtp.KernelLaunchParams()
    launch.grid_x, launch.grid_y, launch.grid_z = gx, gy, gz
    launch.block_x = compiled.metadata.num_warps * 32
    launch.shared_mem = compiled.metadata.shared
    extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in spec.scalar_values(shapes)])
    return compiled.metadata.name.encode(), ptx.encode(), launch, extra


def _python_type(kind: str) -> str:
    return {"int": "int", "float": "float"}[kind]


def qdp_functions(trt, trtp, entry: OpEntry):
    """The (description, aot_impl) pair of one op, written from its entry: tensorrt.plugin derives a plugin's inputs
    and attributes from the functions' parameter names and type hints, so the functions are generated with the entry's
    inputs and attributes as parameters (torch_tensorrt generates its QDPs from a torch op's schema the same way)."""
    from typing import Tuple  # noqa: UP035 - the form tensorrt.plugin's own samples annotate with

    params = ", ".join([f"{name}: trtp.TensorDesc" for name in entry.inputs]
                       + [f"{name}: {_python_type(kind)}" for name, (kind, _) in entry.attributes.items()])
    n_out = len(entry.outputs)
    returns = "trtp.TensorDesc" if n_out == 1 else f"Tuple[{', '.join(['trtp.TensorDesc'] * n_out)}]"
    inputs = f"[{', '.join(entry.inputs)}]"
    attrs = "{" + ", ".join(f"{name!r}: {name}" for name in entry.attributes) + "}"
    source = (f"def describe({params}) -> {returns}:\n"
              f"    outs = _describe({inputs}, {attrs})\n"
              f"    return outs[0] if {n_out} == 1 else outs\n\n"
              f"def aot({params}, outputs: Tuple[trtp.TensorDesc], tactic: int):\n"
              f"    return _aot_result(trt, trtp, {entry.name!r}, {inputs}, {attrs})\n")

    def _describe(descs, attrs):
        """Output descriptors by the entry's shape rule and output dtypes ("T": the first "T" input's dtype)."""
        shapes = trt_rules.output_shapes(entry, [d.shape_expr for d in descs], attrs)
        first_t = descs[list(entry.node_dtypes.values()).index("T")].dtype
        outs = []
        for shape, cls in zip(shapes, entry.output_dtypes):
            outs.append(trtp.from_shape_expr(trtp.ShapeExprs.from_tuple(tuple(shape)),
                                             dtype=first_t if cls == "T" else trt.float32))
        return tuple(outs)

    namespace = {"trt": trt, "trtp": trtp, "Tuple": Tuple, "_describe": _describe, "_aot_result": _aot_result}
    # dont_inherit: real annotation objects (this module's `from __future__ import annotations` would make them strings)
    exec(compile(source, f"<qdp {entry.name}>", "exec", dont_inherit=True), namespace)  # noqa: S102 - registry-built
    return namespace["describe"], namespace["aot"]


def register_qdp() -> list[str]:
    """Register the descriptions (and AOT implementations) of every op with a `trt_qdp` link; returns the plugin ids."""
    trt = lazy_import("tensorrt", "tensorrt>=10.6", "trt", "full-TensorRT plugin descriptions")
    trtp = lazy_import("tensorrt.plugin", "tensorrt>=10.6", "trt", "full-TensorRT plugin descriptions")
    ids = []
    for entry in REGISTRY.values():
        if "trt_qdp" not in entry.links:
            continue
        describe, aot_impl = qdp_functions(trt, trtp, entry)
        trtp.register(entry.qualified_name)(describe)
        trtp.aot_impl(entry.qualified_name)(aot_impl)
        ids.append(entry.qualified_name)
    return ids
