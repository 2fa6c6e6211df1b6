"""Ahead-of-time compile of each plugin's Triton kernel: exactly what a TensorRT `aot_impl` returns.

`compile_for(op, shapes, dtypes, attrs)` runs `triton.compile` on the op's adapter kernel (aot_kernels.py) with the
constexprs, num_warps and num_stages its launch config picks (the single-launch scan kernel's `chunked_launch_config` for
SelectiveScan, the kernel's own `launch_config` for
CausalConv1d; TopKExpertGather's fused single-launch kernel has its own in aot_kernels.py), and returns an
`AotKernel`: kernel name, PTX, grid, block, dynamic shared memory, the parameter order (inputs, int32 scalars,
outputs, then any implicit pointer parameters Triton appends, which are passed as null) and the scalar values. The
grid and scalars come from formulas that work on ints and on TensorRT's symbolic shape expressions alike, so the
full-TensorRT description (trt_qdp.py) and the GPU test (tests/plugins/test_aot_gpu.py, which loads the PTX with CuPy
and launches it with these very numbers) share them.

Compiling needs no GPU (a target is named); the PTX must be loaded by a driver at least as new as the compiling
Triton's PTX ISA (Triton 3.9 here writes PTX 9.4, newer than the H100 machine's driver: compile where you run)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

from ..errors import MambaDeployError, lazy_import
from ..opset import get_op

TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int32": "i32", "int64": "i64"}


def cdiv(a, b):
    """Ceil division on ints or symbolic expressions (anything with + and //)."""
    if isinstance(a, int) and isinstance(b, int):
        return -(-a // b)
    return (a + (b - 1)) // b


@dataclass(frozen=True)
class AotSpec:
    op: str
    launch_config: str  # "module:function" (shapes, dtypes) -> {"constexprs", "num_warps", "num_stages"}
    scalars: tuple  # names, in parameter order
    scalar_values: object  # (shapes) -> tuple of ints or exprs
    grid: object  # (shapes, constexprs) -> (gx, gy, gz)
    attr_constexprs: object = lambda attrs: {}

    @property
    def adapter(self) -> str:
        """The attribute of plugins.aot_kernels that the op's registry entry links as its `trt_adapter`."""
        module, _, attr = get_op(self.op).links["trt_adapter"].partition(":")
        if module != "mambadeploy.plugins.aot_kernels":
            raise MambaDeployError(f"{self.op}: trt_adapter {module}:{attr} is not in plugins.aot_kernels")
        return attr


SPECS = {
    "SelectiveScan": AotSpec(
        op="SelectiveScan",
        launch_config="mambadeploy.kernels.selective_scan:chunked_launch_config",
        scalars=("dim", "seqlen", "d_state"),
        scalar_values=lambda s: (s[0][1], s[0][2], s[2][1]),
        grid=lambda s, c: (s[0][0], cdiv(s[0][1], c["BLOCK_D"]), 1),
        attr_constexprs=lambda attrs: {"DELTA_SOFTPLUS": bool(attrs["delta_softplus"])},
    ),
    "CausalConv1d": AotSpec(
        op="CausalConv1d",
        launch_config="mambadeploy.kernels.causal_conv1d:launch_config",
        scalars=("dim", "seqlen"),
        scalar_values=lambda s: (s[0][1], s[0][2]),
        grid=lambda s, c: (s[0][0], cdiv(s[0][1], c["BLOCK_D"]), cdiv(s[0][2], c["BLOCK_L"])),
        attr_constexprs=lambda attrs: {"SILU": attrs["activation"] == 1},
    ),
    # one fused launch (a TensorRT AOT plugin has no workspace for the kernels' two-launch path): see aot_kernels.py
    "TopKExpertGather": AotSpec(
        op="TopKExpertGather",
        launch_config="mambadeploy.plugins.aot_kernels:expert_gather_launch_config",
        scalars=("d", "F"),
        scalar_values=lambda s: (s[0][1], s[1][1] // 2),
        grid=lambda s, c: (s[0][0], cdiv(s[0][1], c["BLOCK_N"]), 1),
        attr_constexprs=lambda attrs: {"ACTIVATION": int(attrs["activation"])},
    ),
    # the decode step's ops: the torch-fast kernels behind a pure (state in, new state out) adapter
    "CausalConv1dUpdate": AotSpec(
        op="CausalConv1dUpdate",
        launch_config="mambadeploy.kernels.causal_conv1d:update_launch_config",
        scalars=("dim",),
        scalar_values=lambda s: (s[0][1],),
        grid=lambda s, c: (s[0][0], cdiv(s[0][1], c["BLOCK_D"]), 1),
        attr_constexprs=lambda attrs: {"SILU": attrs["activation"] == 1},
    ),
    "SelectiveStateUpdate": AotSpec(
        op="SelectiveStateUpdate",
        launch_config="mambadeploy.kernels.selective_state_update:launch_config",
        scalars=("dim", "d_state"),
        scalar_values=lambda s: (s[0][1], s[0][2]),
        grid=lambda s, c: (s[0][0], cdiv(s[0][1], c["BLOCK_D"]), 1),
        attr_constexprs=lambda attrs: {"DT_SOFTPLUS": bool(attrs["dt_softplus"])},
    ),
    "SparseLinear": AotSpec(  # x (rows, K), weight (N, K): mode and threshold compiled in (one kernel per site)
        op="SparseLinear",
        launch_config="mambadeploy.plugins.aot_kernels:sparse_linear_launch_config",
        scalars=("K", "N"),
        scalar_values=lambda s: (s[0][1], s[1][0]),
        grid=lambda s, c: (s[0][0], cdiv(s[1][0], c["BLOCK_N"]), 1),
        attr_constexprs=lambda attrs: {"MODE": float(attrs["mode"]), "THRESHOLD": float(attrs["threshold"])},
    ),
    "AddRMSNorm": AotSpec(  # (rows, d) inputs, as the decode graphs give them
        op="AddRMSNorm",
        launch_config="mambadeploy.plugins.aot_kernels:add_rms_norm_launch_config",
        scalars=("d",),
        scalar_values=lambda s: (s[0][1],),
        grid=lambda s, c: (s[0][0], 1, 1),
        attr_constexprs=lambda attrs: {"EPS": float(attrs["epsilon"])},
    ),
    "RoutedMoE": AotSpec(  # one fused launch, router included (a TensorRT AOT plugin has no workspace)
        op="RoutedMoE",
        launch_config="mambadeploy.plugins.aot_kernels:routed_moe_launch_config",
        scalars=("d", "F", "E"),
        scalar_values=lambda s: (s[0][1], s[3][1] // 2, s[1][0]),
        grid=lambda s, c: (s[0][0], cdiv(s[0][1], c["BLOCK_N"]), 1),
        attr_constexprs=lambda attrs: {"ROUTER": int(attrs["router"]), "ACTIVATION": int(attrs["activation"]),
                                       "TOP_K": 1 if attrs["router"] == 0 else int(attrs["top_k"])},
    ),
}


# Registry ops whose TensorRT plugin has no ahead-of-time kernel (enqueue refuses with spec_for's message): none.
NO_AOT_KERNEL_YET = ()
# Ops the plugin runs as several launches with a workspace, each from its own module (plan, compile_launches,
# workspace_bytes, enqueue, run_interpreted): DecodeAttention's split-K attention and its combine.
MULTI_LAUNCH = {"DecodeAttention": "mambadeploy.plugins.aot_attention"}


def multi_launch(op: str):
    """The module that compiles and enqueues a multi-launch op's kernels."""
    import importlib

    return importlib.import_module(MULTI_LAUNCH[op])


@dataclass(frozen=True)
class AotKernel:
    op: str
    kernel_name: str
    ptx: str
    arch: int
    grid: tuple
    block: tuple
    shared_mem: int
    params: tuple  # ("input:u", ..., "scalar:dim", ..., "output:y", ..., "implicit:null")
    scalars: tuple  # values of the scalar params, in order
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 1
    triton_version: str = ""

    def summary(self) -> dict:
        d = asdict(self)
        d["ptx_bytes"] = len(self.ptx)
        del d["ptx"]
        return d

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def spec_for(op: str) -> AotSpec:
    get_op(op)
    if op not in SPECS:
        raise MambaDeployError(
            f"op {op} has no ahead-of-time kernel yet (no Triton adapter in plugins/aot_kernels.py); it can be parsed "
            "and built into a plan, but not run"
        )
    return SPECS[op]


def launch_choice(op: str, shapes, dtypes, attrs: dict) -> dict:
    """The kernels' own launch_config at these concrete shapes, plus the constexprs the op's attributes fix."""
    import importlib

    spec = spec_for(op)
    module, _, name = spec.launch_config.partition(":")
    cfg = getattr(importlib.import_module(module), name)(shapes, dtypes)
    attrs = get_op(op).check_attributes(attrs)
    constexprs = dict(cfg["constexprs"])
    constexprs.update(spec.attr_constexprs(attrs))
    if "TOP_K" in constexprs and constexprs["TOP_K"] != attrs.get("top_k", constexprs["TOP_K"]):
        raise MambaDeployError(f"{op}: attribute top_k={attrs['top_k']} but experts has {constexprs['TOP_K']} columns")
    return {"constexprs": constexprs, "num_warps": cfg["num_warps"], "num_stages": cfg.get("num_stages", 1)}


POINTER_ALIGN = 16  # bytes: what the kernels are compiled to assume of every pointer (aligned_pointer_attrs)


def aligned_pointer_attrs(fn, signature: dict) -> dict:
    """triton.compile attrs marking every pointer parameter 16-byte aligned. Triton's JIT does this itself for aligned
    tensors, and it is what lets it vectorise loads (16 B a thread); an ahead-of-time compile without it streams 2-4 B a
    thread (seen: the DecodeAttention plugin path at 1.9x torch-fast's time on the H200). TensorRT's and ORT's buffers
    and our workspace regions are 256-byte aligned; check_aligned refuses a pointer that is not."""
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
            if str(signature.get(name, "")).startswith("*")}


def check_aligned(kernel_name: str, pointers) -> None:
    bad = [hex(int(p)) for p in pointers if int(p) % POINTER_ALIGN]
    if bad:
        raise MambaDeployError(f"{kernel_name}: pointers {', '.join(bad)} are not {POINTER_ALIGN}-byte aligned, which "
                               "the ahead-of-time kernel was compiled to assume (pass whole tensors, not offset views)")


def signature(op: str, dtypes, constexprs: dict) -> dict:
    """Triton signature of the adapter: pointer types from the dtypes TensorRT negotiated, i32 scalars, constexprs."""
    from . import aot_kernels

    spec, entry = spec_for(op), get_op(op)
    adapter = getattr(aot_kernels, spec.adapter)
    in_dtypes = list(dtypes)
    out_dtypes = entry.dtype_rule(tuple(in_dtypes), {})
    types = {}
    for name, dt in zip(entry.inputs, in_dtypes):
        types[name] = "*" + TRITON_TYPES[dt]
    for name in spec.scalars:
        types[name] = "i32"
    for name, dt in zip(entry.outputs, out_dtypes):
        types[name] = "*" + TRITON_TYPES[dt]
    for name in constexprs:
        types[name] = "constexpr"
    missing = [a for a in adapter.arg_names if a not in types]
    if missing:
        raise MambaDeployError(f"adapter {spec.adapter} takes parameters {missing} that the {op} spec does not fill")
    return {a: types[a] for a in adapter.arg_names}


def compile_kernel(op: str, dtypes, attrs: dict, choice_shapes, arch: int | None = None, scalar_hints: bool = False):
    """triton.compile the op's adapter for `dtypes`, with the launch_config picked at `choice_shapes` (concrete ints).
    Returns (compiled kernel, launch choice, parameter order, PTX with only those parameters)."""
    triton = lazy_import("triton", "triton", "gpu", "compiling the plugin kernels ahead of time")
    from triton.backends.compiler import GPUTarget

    from . import aot_kernels

    spec, entry = spec_for(op), get_op(op)
    attrs = entry.check_attributes(attrs or {})
    choice = launch_choice(op, choice_shapes, dtypes, attrs)
    adapter = getattr(aot_kernels, spec.adapter)
    sig = signature(op, dtypes, choice["constexprs"])
    hints = aligned_pointer_attrs(adapter, sig)
    if scalar_hints:  # only for a kernel launched with exactly these scalar values (IPluginV3: recompiled on a shape
        # change; not tensorrt.plugin's one binary per profile): like the JIT, mark the multiples of 16, so row
        # strides such as d allow vector loads
        values = dict(zip(spec.scalars, (int(v) for v in spec.scalar_values(choice_shapes))))
        hints.update({(i,): [["tt.divisibility", 16]] for i, name in enumerate(adapter.arg_names)
                      if name in values and values[name] % 16 == 0})
    src = triton.compiler.ASTSource(fn=adapter, signature=sig, constexprs=choice["constexprs"], attrs=hints)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch or _current_arch(), 32),
                              options={"num_warps": choice["num_warps"], "num_stages": choice["num_stages"]})
    md = compiled.metadata
    if getattr(md, "global_scratch_size", 0) or getattr(md, "profile_scratch_size", 0):
        raise MambaDeployError(f"{op}: the compiled kernel needs global scratch memory, which a TensorRT AOT plugin "
                               "cannot provide")
    params = tuple([f"input:{n}" for n in entry.inputs] + [f"scalar:{n}" for n in spec.scalars]
                   + [f"output:{n}" for n in entry.outputs])
    ptx = strip_unused_trailing_params(compiled.asm["ptx"], md.name, keep=len(params))
    n_params = len(ptx_params(ptx, md.name))
    if n_params < len(params):
        raise MambaDeployError(f"{op}: PTX kernel {md.name} has {n_params} parameters, fewer than {len(params)}")
    params += ("implicit:null",) * (n_params - len(params))  # implicit pointers still referenced: passed as null
    return compiled, choice, params, ptx


def strip_unused_trailing_params(ptx: str, name: str, keep: int) -> str:
    """Drop the parameters Triton appends after ours (global/profile scratch pointers) when the kernel body never reads
    them: TensorRT launches an AOT kernel with exactly inputs + extra args + outputs, so the PTX entry must declare
    exactly those. A trailing parameter that is referenced stays (and is reported as implicit)."""
    m = re.search(r"(\.entry\s+" + re.escape(name) + r"\s*\()(.*?)(\))", ptx, re.S)
    decls = [p for p in m.group(2).split(",") if p.strip()]
    while len(decls) > keep:
        pname = decls[-1].split()[-1]
        if len(re.findall(re.escape(pname) + r"\b", ptx)) > 1:  # used beyond its declaration
            break
        decls.pop()
    return ptx[:m.start(2)] + ",".join(decls) + "\n" + ptx[m.end(2):]


def compile_for(op: str, shapes, dtypes, attrs: dict | None = None, arch: int | None = None,
                choice_shapes=None) -> AotKernel:
    """Compile the op's adapter for `dtypes`; launch numbers for `shapes`. `choice_shapes` (default `shapes`) are the
    shapes whose launch_config fixes the constexprs — an engine compiles once, at its profile's opt shapes, and then
    launches the same binary for every shape in the profile."""
    import triton

    spec = spec_for(op)
    arch = arch or _current_arch()
    compiled, choice, params, ptx = compile_kernel(op, dtypes, attrs or {}, choice_shapes or shapes, arch,
                                                   scalar_hints=choice_shapes is None)
    md = compiled.metadata
    grid = tuple(int(g) for g in spec.grid(shapes, choice["constexprs"]))
    return AotKernel(op=op, kernel_name=md.name, ptx=ptx, arch=arch, grid=grid,
                     block=(md.num_warps * 32, 1, 1), shared_mem=int(md.shared), params=params,
                     scalars=tuple(int(v) for v in spec.scalar_values(shapes)), constexprs=choice["constexprs"],
                     num_warps=md.num_warps, num_stages=choice["num_stages"], triton_version=triton.__version__)


def ptx_params(ptx: str, name: str) -> list[str]:
    """The .param declarations of entry `name`, in order."""
    m = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, re.S)
    if not m:
        raise MambaDeployError(f"PTX has no entry {name}")
    return [p.strip() for p in m.group(1).split(",") if p.strip()]


def _current_arch() -> int:
    import torch

    if not torch.cuda.is_available():
        raise MambaDeployError("no CUDA GPU: name the target architecture (arch=90 for an H100)")
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def launch_on_stream(kernel: AotKernel, inputs, outputs, shapes, stream) -> None:
    """Launch an AotKernel on raw device pointers (TensorRT's enqueue) through CuPy's driver bindings. Written for the
    IPluginV3 enqueue; exercised only through tests/plugins/test_aot_gpu.py's CuPy launch, never inside TensorRT here."""
    cupy = lazy_import("cupy", "cupy-cuda13x", None, "launching plugin kernels")
    fn = load_function(cupy, kernel)
    args = pack_args(kernel, [int(p) for p in inputs], [int(p) for p in outputs])
    with cupy.cuda.ExternalStream(int(stream)):
        fn(kernel.grid, kernel.block, tuple(args), shared_mem=kernel.shared_mem)


_FUNCTIONS: dict = {}


def load_function(cupy, kernel: AotKernel):
    """The PTX loaded through the driver (cuModuleLoadData: JIT to the current GPU), cached per PTX text."""
    key = (kernel.kernel_name, hash(kernel.ptx))
    if key not in _FUNCTIONS:
        module = cupy.cuda.function.Module()
        module.load(kernel.ptx.encode())
        fn = module.get_function(kernel.kernel_name)
        if kernel.shared_mem > 48 * 1024:  # above the default limit the function must opt in (seen on the H200:
            # cupy's Function has no max_dynamic_shared_size_bytes property, only RawKernel does; the driver call does it)
            driver = cupy.cuda.driver
            attribute = getattr(driver, "CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES", 8)  # CUfunction_attribute 8
            driver.funcSetAttribute(fn.ptr, attribute, kernel.shared_mem)
        _FUNCTIONS[key] = (module, fn)  # keep the module alive with its function
    return _FUNCTIONS[key][1]


def pack_args(kernel: AotKernel, input_ptrs, output_ptrs) -> list:
    """Kernel arguments in the kernel's parameter order: pointers as uint64, scalars as int32, implicit params null."""
    import numpy as np

    ins, outs, scal = list(input_ptrs), list(output_ptrs), list(kernel.scalars)
    check_aligned(kernel.kernel_name, ins + outs)
    args = []
    for p in kernel.params:
        kind = p.split(":")[0]
        if kind == "input":
            args.append(np.uint64(ins.pop(0)))
        elif kind == "output":
            args.append(np.uint64(outs.pop(0)))
        elif kind == "scalar":
            args.append(np.int32(scal.pop(0)))
        else:
            args.append(np.uint64(0))
    return args
