"""One kernel source for torch-fast and the ORT CUDA library: compile the torch-fast Triton kernels an export needs
(triton_adapters.py) to cubin for the GPU at hand, and register them with the loaded ORT library (aot_launch.cc),
whose ops then launch them through the CUDA driver API instead of their hand-written CUDA kernels.

    plan = plan_for(export_dir)            # which kernels: the export's custom nodes + its model widths
    kernels = compile_plan(plan, arch=90)  # triton.compile -> cubin (cached on disk by Triton version and source)
    install(library_path, kernels)         # ctypes -> mambadeploy_aot_register

Each kernel is registered under a key (`kernel_key`: role, dtype, the sizes the ORT op knows) and a range of a run-time
size (pairs for the MoE GEMMs, sequence length for the scan): the regimes of the kernels' own launch_config, which
also fixes every tile, warp count and stage count, so the ORT launch is the torch-fast launch.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import MambaDeployError, lazy_import
from ...opset import DOMAIN, get_op

MAX_SIZE = 1 << 62  # "no upper bound" of a variant's range
TRITON_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def kernel_key(role: str, dtype: str, **dims: int) -> str:
    """The table key; aot_launch.cc `Key` writes the same string (names sorted, ints)."""
    return f"{role}|{dtype}|" + ",".join(f"{k}={int(v)}" for k, v in sorted(dims.items()))


@dataclass(frozen=True)
class KernelSpec:
    """One kernel to compile: an adapter, its pointer types, its constexprs, the launch choice, where it goes."""

    key: str
    lo: int
    hi: int
    adapter: str  # attribute of triton_adapters
    pointers: dict  # parameter name -> Triton pointer type ("*bf16", "*i64", ...)
    constexprs: dict
    num_warps: int
    num_stages: int
    meta: dict = field(default_factory=dict)  # launch values the C++ side reads (tiles, segment length)


@dataclass(frozen=True)
class CompiledKernel:
    spec: KernelSpec
    name: str
    cubin: bytes
    shared: int
    n_params: int


# ------------------------------------------------------------------------------------------------------------ plan
def plan_for(export_dir) -> list[KernelSpec]:
    """The kernels an export's custom nodes launch on CUDA, from its graphs (which ops, which inputs are present, their
    attributes) and its manifest (model widths, dtype)."""
    onnx = lazy_import("onnx", "onnx", "onnx", "reading the export's graphs")
    from ...export.manifest import Manifest

    directory = Path(export_dir)
    manifest = Manifest.read(directory)
    cfg, dtype = manifest.model_config, manifest.dtype
    if dtype not in TRITON_DTYPES:
        raise MambaDeployError(f"no AOT kernels for dtype {dtype}")
    specs: dict = {}
    for graph in manifest.graphs.values():
        model = onnx.load(str(directory / graph.file), load_external_data=False)
        for node in model.graph.node:
            if node.domain != DOMAIN:
                continue
            entry = get_op(node.op_type)
            attrs = entry.check_attributes({a.name: onnx.helper.get_attribute_value(a) for a in node.attribute})
            # input name -> present in this node (an optional input left out is "" or missing at the end)
            present = {name: i < len(node.input) and bool(node.input[i]) for i, name in enumerate(entry.inputs)}
            if node.op_type == "SelectiveScan":
                flags = dict(D=present["D"], z=present["z"], bias=present["delta_bias"], h0=present["initial_state"],
                             softplus=bool(attrs["delta_softplus"]))
                new = scan_specs(dtype, cfg.mamba.d_state, **flags)
            elif node.op_type == "CausalConv1d":
                K = _initializer_dim(model, node.input[entry.inputs.index("weight")], 1) or cfg.mamba.d_conv
                new = conv_specs(dtype, K, bias=present["bias"], init=present["initial_state"],
                                 silu=attrs["activation"] == 1)
            elif node.op_type in ("TopKExpertGather", "RoutedMoE"):
                k = 1 if node.op_type == "RoutedMoE" and attrs["router"] == 0 else int(attrs["top_k"])
                new = moe_specs(dtype, cfg.d_model, cfg.moe.ffn_size, cfg.moe.n_experts, k, int(attrs["activation"]),
                                experts_int64=node.op_type == "TopKExpertGather")
            elif node.op_type == "DecodeAttention":
                a = cfg.attention
                new = attention_specs(dtype, a.n_heads // a.n_kv_heads, a.head_dim)
            else:
                continue
            specs.update({(s.key, s.lo): s for s in new})
    return list(specs.values())


def _initializer_dim(model, name: str, axis: int) -> int | None:
    """A dimension of an initializer's shape (None when `name` is computed in the graph)."""
    for init in model.graph.initializer:
        if init.name == name:
            return int(init.dims[axis])
    return None


def conv_specs(dtype: str, K: int, *, bias: bool, init: bool, silu: bool) -> list[KernelSpec]:
    """The prefill causal conv (one launch; its tile does not depend on the length)."""
    from ...kernels.causal_conv1d import launch_config

    t = TRITON_DTYPES[dtype]
    cfg = launch_config(((1, 64, 64), (64, K)))
    return [KernelSpec(kernel_key("conv", t, K=K, bias=bias, init=init, silu=silu), 1, MAX_SIZE, "conv_ort",
                       {"x": "*" + t, "weight": "*" + t, "bias": "*" + t, "initial_state": "*fp32", "y": "*" + t,
                        "final_state": "*fp32"},
                       dict(cfg["constexprs"], HAS_BIAS=bias, HAS_INIT=init, SILU=silu), cfg["num_warps"],
                       cfg["num_stages"], meta=dict(cfg["constexprs"]))]


def moe_specs(dtype: str, d: int, F: int, E: int, k: int, activation: int, experts_int64: bool) -> list[KernelSpec]:
    """The grouped-GEMM MoE (align, fc1, fc2, and the k-sum for top-k) in each regime of moe_experts.launch_config
    from 2 pairs up (one pair stays on the hand-written GEMV)."""
    import torch

    from ...kernels.common import dot_precision, next_pow2
    from ...kernels.moe_experts import launch_config

    t = TRITON_DTYPES[dtype]
    torch_dtype = getattr(torch, dtype)
    bound = 16 * E  # moe_experts.launch_config: up to 16 pairs an expert, 16-row blocks
    specs = []
    for lo, hi in ((2, bound), (bound + 1, MAX_SIZE)):
        if hi < lo:
            continue
        T = -(-hi // k) if hi < MAX_SIZE else -(-(bound + 1) // k) * 4
        cfg = launch_config(((T, d), (E, 2 * F, d), (E, d, F), (T, k), (T, k)), (torch_dtype,))
        if cfg["path"] != "gemm":
            raise MambaDeployError(f"moe_specs: expected the grouped GEMM at {T * k} pairs, got {cfg['path']}")
        bm = cfg["align"]["block_m"]
        common = {"PRECISION": dot_precision(torch_dtype)}
        c1, c2 = cfg["fc1"], cfg["fc2"]
        specs.append(KernelSpec(
            kernel_key("moe.fc1", t, d=d, F=F, E=E, k=k, act=activation), lo, hi, "moe_fc1_ort",
            {n: "*" + t for n in ("x", "w1", "h")} | {"sorted_pairs": "*i32", "block_expert": "*i32"},
            dict(d=d, F=F, E=E, TOP_K=k, ACTIVATION=activation, **c1["constexprs"], **common),
            c1["num_warps"], c1["num_stages"], meta=dict(c1["constexprs"])))
        specs.append(KernelSpec(
            kernel_key("moe.fc2", t, d=d, F=F, E=E, k=k), lo, hi, "moe_fc2_ort",
            {"h": "*" + t, "w2": "*" + t, "sorted_pairs": "*i32", "block_expert": "*i32", "weights": "*fp32",
             "out": "*" + (t if k == 1 else "fp32")},
            dict(d=d, F=F, E=E, TOP_K=k, **c2["constexprs"], **common),
            c2["num_warps"], c2["num_stages"], meta=dict(c2["constexprs"])))
        block_p = 1024 if hi == MAX_SIZE else min(1024, max(16, next_pow2(hi)))
        specs.append(KernelSpec(
            kernel_key("moe.align.i64" if experts_int64 else "moe.align.i32", "-", E=E), lo, hi, "moe_align_ort",
            {"experts": "*i64" if experts_int64 else "*i32", "sorted_pairs": "*i32", "block_expert": "*i32"},
            dict(E=E, BLOCK_M=bm, BLOCK_E=max(2, next_pow2(E)), BLOCK_P=block_p), 4, 1, meta={"BLOCK_M": bm}))
    if k > 1:
        block = min(1024, next_pow2(d))
        specs.append(KernelSpec(kernel_key("moe.sum", t, d=d, k=k), 2, MAX_SIZE, "moe_sum_ort",
                                {"rows": "*fp32", "y": "*" + t}, dict(d=d, TOP_K=k, BLOCK=block),
                                max(1, min(8, block // 256)), 1, meta={"BLOCK": block}))
    return specs


def attention_specs(dtype: str, group: int, head_dim: int) -> list[KernelSpec]:
    """DecodeAttention: the slot write, the split-K kernel and its combine, behind the TensorRT plugin's own adapters
    (plugins/aot_kernels.py: one adapter set for both AOT paths). The split count is computed in C++ from the shapes
    with decode_attention.launch_config's numbers (meta); the combine has a variant per range of splits (its BLOCK_S)."""
    import torch

    from ...kernels.common import dot_precision, next_pow2
    from ...kernels.decode_attention import MAX_SPLITS, TARGET_PROGRAMS, launch_config

    t = TRITON_DTYPES[dtype]
    cfg = launch_config(((1, group, head_dim), (1, 1, 64, head_dim)))
    c = cfg["constexprs"]
    block_d = next_pow2(head_dim)
    specs = [
        KernelSpec(kernel_key("attn.write", t, hd=head_dim), 1, MAX_SIZE, "decode_attention_write_trt",
                   {"k": "*" + t, "v": "*" + t, "pos": "*i64", "present_key": "*" + t, "present_value": "*" + t,
                    "lengths": "*i32"}, {"HEAD_DIM": head_dim, "BLOCK_D": block_d}, 1, 1),
        KernelSpec(kernel_key("attn.split", t, G=group, hd=head_dim), 1, MAX_SIZE, "decode_attention_split_trt",
                   {"q": "*" + t, "present_key": "*" + t, "present_value": "*" + t, "lengths": "*i32",
                    "scale": "fp32", "part": "*fp32", "lse": "*fp32"},
                   dict(c, HEAD_DIM=head_dim, GROUP=group, UPCAST=False, PRECISION=dot_precision(getattr(torch, dtype))),
                   cfg["num_warps"], cfg["num_stages"],
                   meta={"BLOCK_N": c["BLOCK_N"], "TARGET_PROGRAMS": TARGET_PROGRAMS, "MAX_SPLITS": MAX_SPLITS})]
    lo = 1
    while lo <= MAX_SPLITS:
        hi = next_pow2(lo)
        specs.append(KernelSpec(kernel_key("attn.combine", t, hd=head_dim), lo, MAX_SIZE if hi >= MAX_SPLITS else hi,
                                "decode_attention_combine_trt", {"part": "*fp32", "lse": "*fp32", "out": "*" + t},
                                {"HEAD_DIM": head_dim, "BLOCK_S": hi, "BLOCK_D": block_d}, 1 if hi <= 32 else 4, 1))
        lo = hi + 1
    return specs


def scan_specs(dtype: str, d_state: int, *, D: bool, z: bool, bias: bool, h0: bool, softplus: bool) -> list[KernelSpec]:
    """The segment-parallel scan (state pass, fold, output pass) in each regime of selective_scan.launch_config."""
    from ...kernels.common import next_pow2
    from ...kernels.selective_scan import FOLD_BLOCK, SEG_LONG_FROM, launch_config

    t = TRITON_DTYPES[dtype]
    flags = dict(D=D, z=z, bias=bias, h0=h0, softplus=softplus)
    specs = []
    for lo, hi in ((1, SEG_LONG_FROM - 1), (SEG_LONG_FROM, MAX_SIZE)):
        cfg = launch_config(((1, 64, lo), (64, d_state), (64, d_state)))
        c = cfg["constexprs"]
        meta = dict(c, seg_len=cfg["scalars"]["seg_len"])
        pointers = {n: "*" + t for n in ("u", "delta", "B", "C", "D", "z", "delta_bias", "y")}
        pointers |= {n: "*fp32" for n in ("A", "h0", "h_last", "hseg", "dseg")}
        for role, state_pass in (("scan.state", True), ("scan.out", False)):
            specs.append(KernelSpec(
                kernel_key(role, t, N=d_state, **flags), lo, hi, "scan_pass_ort", pointers,
                dict(d_state=d_state, HAS_D=D, HAS_Z=z, HAS_DELTA_BIAS=bias, DELTA_SOFTPLUS=softplus, HAS_H0=h0,
                     STATE_PASS=state_pass, **c), cfg["num_warps"], cfg["num_stages"], meta=meta))
        specs.append(KernelSpec(
            kernel_key("scan.fold", "-", N=d_state, h0=h0), lo, hi, "scan_fold_ort",
            {n: "*fp32" for n in ("A", "h0", "hseg", "dseg")},
            dict(d_state=d_state, HAS_H0=h0, BLOCK_N=next_pow2(d_state), BLOCK=FOLD_BLOCK), 4, 1,
            meta={"BLOCK": FOLD_BLOCK}))
    return specs


# --------------------------------------------------------------------------------------------------------- compile
def compile_plan(specs, arch: int | None = None, progress=None) -> list[CompiledKernel]:
    """triton.compile each spec for `arch` (default: the current GPU). Triton's own cache makes a repeat cheap."""
    return [compile_spec(s, arch) for s in (progress(specs) if progress else specs)]


def compile_spec(spec: KernelSpec, arch: int | None = None) -> CompiledKernel:
    triton = lazy_import("triton", "triton", "gpu", "compiling the ORT library's kernels ahead of time")
    from triton.backends.compiler import GPUTarget

    from .. import aot
    from . import triton_adapters

    fn = getattr(triton_adapters, spec.adapter)
    signature = {}
    for name in fn.arg_names:
        signature[name] = "constexpr" if name in spec.constexprs else spec.pointers.get(name, "i32")
    unknown = set(spec.pointers) - set(fn.arg_names)
    if unknown:
        raise MambaDeployError(f"{spec.adapter}: spec names parameters it does not have: {sorted(unknown)}")
    # every pointer is 16-byte aligned (ORT's CUDA allocations are 256-aligned; ops_cuda_aot.cc checks before launching)
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=spec.constexprs,
                                    attrs=aot.aligned_pointer_attrs(fn, signature))
    compiled = triton.compile(src, target=GPUTarget("cuda", arch or aot._current_arch(), 32),
                              options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    md = compiled.metadata
    if getattr(md, "global_scratch_size", 0) or getattr(md, "profile_scratch_size", 0):
        raise MambaDeployError(f"{spec.adapter}: the compiled kernel needs global scratch memory")
    n_params = len(aot.ptx_params(compiled.asm["ptx"], md.name))
    return CompiledKernel(spec=spec, name=md.name, cubin=bytes(compiled.asm["cubin"]), shared=int(md.shared),
                          n_params=n_params)


# --------------------------------------------------------------------------------------------------------- install
@functools.lru_cache(maxsize=None)
def _open_library(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)  # the handle ORT holds: dlopen of one file gives one copy of the table
    lib.mambadeploy_aot_register.restype = ctypes.c_int
    lib.mambadeploy_aot_register.argtypes = [
        ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int64, ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_int64)]
    lib.mambadeploy_aot_error.restype = ctypes.c_char_p
    return lib


def _library(path) -> ctypes.CDLL:
    """The library ORT loaded, opened once per path (its argument types set once)."""
    return _open_library(str(path))


def install(library, kernels: list[CompiledKernel]) -> int:
    """Register compiled kernels with the ORT CUDA library at `library` (the path ORT loaded). Call it with the CUDA
    device current (modules load at once, never inside a CUDA-graph capture). Returns the number registered."""
    lib = _library(library)
    for k in kernels:
        names = list(k.spec.meta)
        c_names = (ctypes.c_char_p * max(1, len(names)))(*[n.encode() for n in names])
        c_values = (ctypes.c_int64 * max(1, len(names)))(*[int(k.spec.meta[n]) for n in names])
        rc = lib.mambadeploy_aot_register(k.spec.key.encode(), k.cubin, len(k.cubin), k.name.encode(),
                                          k.spec.num_warps * 32, k.shared, k.n_params, k.spec.lo, k.spec.hi,
                                          len(names), c_names, c_values)
        if rc != 0:
            raise MambaDeployError(f"registering AOT kernel {k.name} ({k.spec.key}) with {library}: "
                                   f"{lib.mambadeploy_aot_error().decode()}")
    return len(kernels)


def enable(library, on: bool) -> None:
    """Turn the AOT launches on or off for every session of this process (off: the hand-written CUDA kernels run)."""
    _library(library).mambadeploy_aot_enable(int(bool(on)))


def stats(library, reset: bool = False) -> dict:
    """{"variants": registered, "launches": AOT launches, "fallbacks": ops that found no kernel} since the last reset."""
    vals = [ctypes.c_int64() for _ in range(3)]
    _library(library).mambadeploy_aot_stats(*[ctypes.byref(v) for v in vals], int(reset))
    return dict(zip(("variants", "launches", "fallbacks"), (v.value for v in vals)))


def plan_digest(specs) -> str:
    """A short fingerprint of a plan (for describe())."""
    return hashlib.sha256(json.dumps([s.key + f"@{s.lo}" for s in specs], sort_keys=True).encode()).hexdigest()[:12]
