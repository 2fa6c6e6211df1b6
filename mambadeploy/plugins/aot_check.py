"""Check an AOT kernel the way TensorRT would run it: compile (aot.compile_for), load the PTX through the CUDA driver
(CuPy), launch with exactly the returned grid/block/shared memory/parameter order on contiguous device buffers, and compare
with the op's `_ref`. Used by tests/plugins/test_aot_gpu.py and benchmarks/plugins_aot_check.py (GPU only). The comparison against tolerances happens in the tests (validate/ is a floor above plugins/)."""

from __future__ import annotations

import torch

from ..opset import get_op
from . import aot

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def selective_scan_inputs(batch, dim, L, d_state, dtype, device, seed=0):
    """Random inputs in op order, with the dtypes an export gives: activations in `dtype`, A and states fp32,
    D / delta_bias in `dtype` (parameters of the model dtype)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = TORCH_DTYPES[dtype]

    def r(*shape, scale=1.0, dt=t):
        return (torch.randn(*shape, generator=g) * scale).to(dt).to(device).contiguous()

    u, delta, z = r(batch, dim, L), r(batch, dim, L, scale=0.5), r(batch, dim, L)
    A = -torch.exp(torch.randn(dim, d_state, generator=g) * 0.5).to(device)
    B, C = r(batch, d_state, L), r(batch, d_state, L)
    D, delta_bias = r(dim), r(dim, scale=0.5)
    h0 = r(batch, dim, d_state, dt=torch.float32)
    return [u, delta, A, B, C, D, z, delta_bias, h0]


INPUT_MAKERS = {"SelectiveScan": selective_scan_inputs}


def reference(op: str, inputs, attrs):
    entry = get_op(op)
    ref = entry.resolve("reference")
    if op == "SelectiveScan":
        u, delta, A, B, C, D, z, delta_bias, h0 = inputs
        return ref(u, delta, A, B, C, D, z, delta_bias, bool(attrs["delta_softplus"]), h0)
    raise KeyError(op)


def run_aot(op: str, inputs, attrs, choice_shapes=None):
    """Launch the AOT kernel on `inputs` (CUDA tensors); returns (outputs, AotKernel)."""
    import cupy

    entry = get_op(op)
    shapes = [tuple(x.shape) for x in inputs]
    dtypes = [str(x.dtype).replace("torch.", "") for x in inputs]
    kernel = aot.compile_for(op, shapes, dtypes, attrs, choice_shapes=choice_shapes)
    out_dtypes = entry.dtype_rule(tuple(dtypes), attrs)
    out_shapes = entry.shape_rule(tuple(shapes), attrs)
    outputs = [torch.full(s, float("nan"), dtype=TORCH_DTYPES[d], device=inputs[0].device)  # poisoned
               for s, d in zip(out_shapes, out_dtypes)]
    fn = aot.load_function(cupy, kernel)
    args = aot.pack_args(kernel, [x.data_ptr() for x in inputs], [y.data_ptr() for y in outputs])
    stream = torch.cuda.current_stream().cuda_stream
    with cupy.cuda.ExternalStream(stream):
        fn(kernel.grid, kernel.block, tuple(args), shared_mem=kernel.shared_mem)
    torch.cuda.synchronize()
    return outputs, kernel
