"""The ops as `tensorrt.plugin` (TensorRT >= 10.6) descriptions for full TensorRT: a shape/type description per op and,
where an AOT kernel exists (aot.SPECS), an `aot_impl` returning the Triton-compiled PTX, its kernel name, launch
parameters and int32 scalar arguments — so the engine runs under trtexec or C++ with no Python.

Importable without TensorRT: nothing from tensorrt is imported until `register_qdp()` runs. It CANNOT run here (full
TensorRT is not installable on these machines); the pieces it delegates to — shape/dtype rules (trt_rules), the AOT
compile and the grid/scalar formulas (aot) — are the ones tests exercise, the latter on the H100 via CuPy.

Why the functions are defined inside `register_qdp`: tensorrt.plugin reads each function's parameter names and type
hints to derive the plugin's inputs and attributes, so the hints must be real `trtp` classes, which exist only after
import."""

from __future__ import annotations

from ..errors import lazy_import
from ..opset import DOMAIN
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


def register_qdp() -> list[str]:
    """Register the descriptions (and AOT implementations) with tensorrt.plugin; returns the plugin ids."""
    trt = lazy_import("tensorrt", "tensorrt>=10.6", "trt", "full-TensorRT plugin descriptions")
    trtp = lazy_import("tensorrt.plugin", "tensorrt>=10.6", "trt", "full-TensorRT plugin descriptions")
    from typing import Tuple

    ids = []

    @trtp.register(f"{DOMAIN}::SelectiveScan")
    def selective_scan_desc(u: trtp.TensorDesc, delta: trtp.TensorDesc, A: trtp.TensorDesc, B: trtp.TensorDesc,
                            C: trtp.TensorDesc, D: trtp.TensorDesc, z: trtp.TensorDesc, delta_bias: trtp.TensorDesc,
                            initial_state: trtp.TensorDesc, delta_softplus: int
                            ) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        y = u.like()
        state = initial_state.like()
        state.dtype = trt.float32
        return y, state

    @trtp.aot_impl(f"{DOMAIN}::SelectiveScan")
    def selective_scan_aot(u: trtp.TensorDesc, delta: trtp.TensorDesc, A: trtp.TensorDesc, B: trtp.TensorDesc,
                           C: trtp.TensorDesc, D: trtp.TensorDesc, z: trtp.TensorDesc, delta_bias: trtp.TensorDesc,
                           initial_state: trtp.TensorDesc, delta_softplus: int, outputs: Tuple[trtp.TensorDesc],
                           tactic: int):
        return _aot_result(trt, trtp, "SelectiveScan", [u, delta, A, B, C, D, z, delta_bias, initial_state],
                           {"delta_softplus": delta_softplus})

    ids.append(f"{DOMAIN}::SelectiveScan")

    @trtp.register(f"{DOMAIN}::CausalConv1d")
    def causal_conv1d_desc(x: trtp.TensorDesc, weight: trtp.TensorDesc, bias: trtp.TensorDesc,
                           initial_state: trtp.TensorDesc, activation: int) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        state = initial_state.like()
        state.dtype = trt.float32
        return x.like(), state

    @trtp.aot_impl(f"{DOMAIN}::CausalConv1d")
    def causal_conv1d_aot(x: trtp.TensorDesc, weight: trtp.TensorDesc, bias: trtp.TensorDesc,
                          initial_state: trtp.TensorDesc, activation: int, outputs: Tuple[trtp.TensorDesc],
                          tactic: int):
        return _aot_result(trt, trtp, "CausalConv1d", [x, weight, bias, initial_state], {"activation": activation})

    ids.append(f"{DOMAIN}::CausalConv1d")

    @trtp.register(f"{DOMAIN}::TopKExpertGather")
    def expert_gather_desc(x: trtp.TensorDesc, w1: trtp.TensorDesc, w2: trtp.TensorDesc, experts: trtp.TensorDesc,
                           weights: trtp.TensorDesc, activation: int, top_k: int) -> trtp.TensorDesc:
        return x.like()

    @trtp.aot_impl(f"{DOMAIN}::TopKExpertGather")
    def expert_gather_aot(x: trtp.TensorDesc, w1: trtp.TensorDesc, w2: trtp.TensorDesc, experts: trtp.TensorDesc,
                          weights: trtp.TensorDesc, activation: int, top_k: int, outputs: Tuple[trtp.TensorDesc],
                          tactic: int):
        return _aot_result(trt, trtp, "TopKExpertGather", [x, w1, w2, experts, weights],
                           {"activation": activation, "top_k": top_k})

    ids.append(f"{DOMAIN}::TopKExpertGather")
    return ids
