"""DecodeAttention's ahead-of-time launches: the TensorRT IPluginV3 enqueue runs torch-fast's own decode-attention
kernels (kernels/decode_attention.py: the split-K kernel and its combine), compiled with triton.compile exactly as
aot.py compiles the single-launch ops, behind the adapters of aot_kernels.py:

  1. decode_attention_write_trt   grid (B, KV)          k/v into the present caches at slot pos[b]; lengths = pos + 1
  2. decode_attention_split_trt   grid (B, KV, splits)  online-softmax partials of slots [0, pos[b]] (workspace)
  3. decode_attention_combine_trt grid (B, H)           the splits' partials weighted by their log-sum-exp -> out

The launch numbers (grid, splits, tiles, warps) are decode_attention.launch_config's at the shapes run, so the plugin
launches what torch-fast launches. present_* alias the past caches (the plugin declares it through
IPluginV3OneBuildV2.get_aliased_input where the TensorRT build has ALIASED_PLUGIN_IO_10_03): then a step writes one slot
and reads the filled ones. Where TensorRT hands separate output buffers, `enqueue` copies each cache once first
(correct, O(cache)). The workspace holds lengths (int32), the log-sum-exps and the fp32 partials.

`plan` is the one source of those numbers: `compile_launches` (GPU/PTX) and `run_interpreted` (Triton's CPU
interpreter, CI) both read it."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MambaDeployError, lazy_import
from . import aot

OP = "DecodeAttention"
ADAPTERS = ("decode_attention_write_trt", "decode_attention_split_trt", "decode_attention_combine_trt")
ALIGN = 256  # workspace regions start on 256-byte boundaries (Triton assumes 16-byte aligned pointers)


@dataclass(frozen=True)
class Launch:
    """One launch: the adapter, its pointer parameters (name -> Triton type), scalars (int -> i32, float -> fp32),
    constexprs, grid."""

    adapter: str
    pointers: dict
    scalars: dict
    constexprs: dict
    grid: tuple
    num_warps: int
    num_stages: int = 1


def _dims(shapes):
    (batch, heads, head_dim), (_, kv_heads, slots, hd2) = shapes[0], shapes[3]
    if hd2 != head_dim or heads % kv_heads:
        raise MambaDeployError(f"{OP}: q {shapes[0]} and caches {shapes[3]} do not fit (B, H, hd) / (B, KV, S, hd)")
    return batch, heads, kv_heads, slots, head_dim


def plan(shapes, dtype: str, attrs: dict, interpret: bool = False) -> list[Launch]:
    """The three launches at these concrete shapes (op input order: q, k, v, key_cache, value_cache, pos)."""
    import math

    import torch

    from ..kernels.common import dot_precision, dot_upcast, next_pow2
    from ..kernels.decode_attention import launch_config
    from ..opset import get_op

    attrs = get_op(OP).check_attributes(attrs)
    batch, heads, kv_heads, slots, head_dim = _dims(shapes)
    cfg = launch_config((shapes[0], shapes[3]))
    splits = cfg["splits"]
    t = "*" + aot.TRITON_TYPES[dtype]
    torch_dtype = getattr(torch, dtype)
    scale = float(attrs["scale"]) or 1.0 / math.sqrt(head_dim)
    write = Launch("decode_attention_write_trt",
                   {"k": t, "v": t, "pos": "*i64", "present_key": t, "present_value": t, "lengths": "*i32"},
                   {"kv_heads": kv_heads, "slots": slots},
                   {"HEAD_DIM": head_dim, "BLOCK_D": next_pow2(head_dim)}, (batch, kv_heads, 1), 1)
    split = Launch("decode_attention_split_trt",
                   {"q": t, "present_key": t, "present_value": t, "lengths": "*i32", "part": "*fp32", "lse": "*fp32"},
                   {"kv_heads": kv_heads, "slots": slots, "n_splits": splits, "scale": scale},
                   dict(cfg["constexprs"], HEAD_DIM=head_dim, GROUP=heads // kv_heads,
                        UPCAST=dot_upcast(torch_dtype, interpret), PRECISION=dot_precision(torch_dtype)),
                   tuple(cfg["grid"]), cfg["num_warps"], cfg["num_stages"])
    combine = Launch("decode_attention_combine_trt", {"part": "*fp32", "lse": "*fp32", "out": t}, {"n_splits": splits},
                     {"HEAD_DIM": head_dim, "BLOCK_S": next_pow2(splits), "BLOCK_D": next_pow2(head_dim)},
                     tuple(cfg["combine_grid"]) + (1,), 1 if splits <= 32 else 4)
    return [write, split, combine]


def workspace_layout(batch: int, heads: int, slots: int, head_dim: int) -> dict:
    """name -> (byte offset, element count) of the workspace regions, sized for the most splits these shapes take."""
    from ..kernels.decode_attention import launch_config

    splits = max(launch_config(((b, heads, head_dim), (b, 1, slots, head_dim)))["splits"] for b in (1, batch))
    layout, offset = {}, 0
    for name, count, size in (("lengths", batch, 4), ("lse", batch * heads * splits, 4),
                              ("part", batch * heads * splits * head_dim, 4)):
        layout[name] = (offset, count)
        offset += -(-count * size // ALIGN) * ALIGN
    layout["total"] = (offset, 0)
    return layout


def workspace_bytes(max_shapes) -> int:
    """The workspace for the largest shapes of a TensorRT profile (get_workspace_size). The splits never exceed
    launch_config's bound at batch 1 with one KV head, which `workspace_layout` takes."""
    batch, heads, _, slots, head_dim = _dims(max_shapes)
    return workspace_layout(batch, heads, slots, head_dim)["total"][0]


# --------------------------------------------------------------------------------------------------- GPU (PTX)
def scalar_type(launch: Launch, name: str) -> str:
    return "fp32" if isinstance(launch.scalars.get(name), float) else "i32"


def _scalar(value):
    import numpy as np

    return np.float32(value) if isinstance(value, float) else np.int32(value)


def compile_launches(shapes, dtypes, attrs: dict, arch: int | None = None) -> list[aot.AotKernel]:
    """triton.compile each adapter for `arch`; params in the adapter's order ("ptr:NAME", "scalar:NAME")."""
    triton = lazy_import("triton", "triton", "gpu", "compiling the DecodeAttention plugin kernels ahead of time")
    from triton.backends.compiler import GPUTarget

    from . import aot_kernels

    arch = arch or aot._current_arch()
    kernels = []
    for launch in plan(shapes, dtypes[0], attrs):
        fn = getattr(aot_kernels, launch.adapter)
        signature = {n: "constexpr" if n in launch.constexprs else launch.pointers.get(n, scalar_type(launch, n))
                     for n in fn.arg_names}
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=launch.constexprs,
                                        attrs=aot.aligned_pointer_attrs(fn, signature))
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
        md = compiled.metadata
        if getattr(md, "global_scratch_size", 0) or getattr(md, "profile_scratch_size", 0):
            raise MambaDeployError(f"{launch.adapter}: the compiled kernel needs global scratch memory")
        params = tuple(("scalar:" if n in launch.scalars else "ptr:") + n
                       for n in fn.arg_names if n not in launch.constexprs)
        ptx = aot.strip_unused_trailing_params(compiled.asm["ptx"], md.name, keep=len(params))
        params += ("implicit:null",) * (len(aot.ptx_params(ptx, md.name)) - len(params))
        kernels.append(aot.AotKernel(
            op=OP, kernel_name=md.name, ptx=ptx, arch=arch, grid=launch.grid, block=(md.num_warps * 32, 1, 1),
            shared_mem=int(md.shared), params=params, scalars=tuple(launch.scalars[p[7:]] for p in params
                                                                      if p.startswith("scalar:")),
            constexprs=launch.constexprs, num_warps=md.num_warps, num_stages=launch.num_stages,
            triton_version=triton.__version__))
    return kernels


def enqueue(kernels, inputs, outputs, workspace: int, shapes, dtype: str, stream) -> None:
    """The plugin's enqueue on raw device pointers (inputs/outputs in op order). Copies a cache whose present buffer
    is not its past buffer (TensorRT did not alias them), then the three launches on `stream`."""
    import numpy as np

    cupy = lazy_import("cupy", "cupy-cuda13x", None, "launching plugin kernels")
    batch, heads, _, slots, head_dim = _dims(shapes)
    layout = workspace_layout(batch, heads, slots, head_dim)
    ptrs = {"q": inputs[0], "k": inputs[1], "v": inputs[2], "pos": inputs[5], "out": outputs[0],
            "present_key": outputs[1], "present_value": outputs[2]}
    ptrs.update({name: int(workspace) + off for name, (off, _) in layout.items() if name != "total"})
    cache_bytes = int(np.prod(shapes[3])) * {"float32": 4}.get(dtype, 2)
    with cupy.cuda.ExternalStream(int(stream)) as s:
        for past, present in ((inputs[3], outputs[1]), (inputs[4], outputs[2])):
            if int(past) != int(present):  # not aliased: the step still has to hand back the whole cache
                cupy.cuda.runtime.memcpyAsync(int(present), int(past), cache_bytes,
                                              cupy.cuda.runtime.memcpyDeviceToDevice, s.ptr)
        aot.check_aligned(OP, ptrs.values())
        for k in kernels:
            scalars = iter(k.scalars)
            args = [_scalar(next(scalars)) if p.startswith("scalar:") else
                    np.uint64(int(ptrs[p[4:]]) if p.startswith("ptr:") else 0) for p in k.params]
            aot.load_function(cupy, k)(k.grid, k.block, tuple(args), shared_mem=k.shared_mem)


# --------------------------------------------------------------------------------------------------- interpreter
def run_interpreted(inputs, attrs: dict, alias: bool = False):
    """The three adapters in Triton's CPU interpreter (the process must run with TRITON_INTERPRET=1) on CPU tensors
    with the plan's launch numbers: (out, present_key, present_value). alias: write into the input caches (what an
    aliased TensorRT binding does) instead of copies."""
    import torch

    from . import aot_kernels

    q, k, v, key_cache, value_cache, pos = inputs
    batch, heads, _, slots, head_dim = _dims([tuple(x.shape) for x in inputs])
    dtype = str(q.dtype).removeprefix("torch.")
    layout = workspace_layout(batch, heads, slots, head_dim)
    tensors = {"q": q, "k": k, "v": v, "pos": pos, "out": torch.empty_like(q),
               "present_key": key_cache if alias else key_cache.clone(),
               "present_value": value_cache if alias else value_cache.clone(),
               "lengths": torch.empty(layout["lengths"][1], dtype=torch.int32),
               "lse": torch.full((layout["lse"][1],), float("nan")),
               "part": torch.full((layout["part"][1],), float("nan"))}
    for launch in plan([tuple(x.shape) for x in inputs], dtype, attrs, interpret=True):
        fn = getattr(aot_kernels, launch.adapter)
        args = {n: tensors[n] for n in launch.pointers} | launch.scalars | launch.constexprs
        fn[launch.grid](*[args[n] for n in fn.arg_names])
    return tensors["out"], tensors["present_key"], tensors["present_value"]
