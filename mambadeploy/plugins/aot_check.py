"""Check an AOT kernel the way TensorRT would run it: compile (aot.compile_for), load the PTX through the CUDA driver
(CuPy), launch with exactly the returned grid/block/shared memory/parameter order on contiguous device buffers, and
compare with the op's `_ref` (tests/plugins/test_aot_gpu.py, GPU only). `run_interpreted` runs the same adapter in
Triton's CPU interpreter with the same launch numbers (tests/plugins/test_aot_interpreted.py, CI). The comparison
against tolerances happens in the tests (validate/ is a floor above plugins/)."""

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


def causal_conv1d_inputs(batch, dim, L, K, dtype, device, seed=0):
    """x (batch, dim, L) in `dtype`, weight (dim, K) and bias (dim,) in `dtype`, initial_state fp32."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = TORCH_DTYPES[dtype]

    def r(*shape, scale=1.0, dt=t):
        return (torch.randn(*shape, generator=g) * scale).to(dt).to(device).contiguous()

    return [r(batch, dim, L), r(dim, K, scale=0.5), r(dim, scale=0.5), r(batch, dim, K, dt=torch.float32)]


def expert_gather_inputs(tokens, d, F, experts, top_k, dtype, device, seed=0, index_dtype=torch.int64):
    """x (T, d), w1 (E, 2F, d), w2 (E, d, F) in `dtype` (scaled so activations stay O(1)); experts (T, k) distinct per
    token; weights (T, k) fp32, as the routers give them."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = TORCH_DTYPES[dtype]

    def r(*shape, scale=1.0, dt=t):
        return (torch.randn(*shape, generator=g) * scale).to(dt).to(device).contiguous()

    x = r(tokens, d)
    w1, w2 = r(experts, 2 * F, d, scale=d ** -0.5), r(experts, d, F, scale=F ** -0.5)
    chosen = torch.argsort(torch.rand(tokens, experts, generator=g), dim=1)[:, :top_k].to(index_dtype)
    weights = torch.rand(tokens, top_k, generator=g)
    return [x, w1, w2, chosen.to(device).contiguous(), weights.to(device).contiguous()]


def _randn(seed, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = TORCH_DTYPES[dtype]

    def r(*shape, scale=1.0, dt=t):
        return (torch.randn(*shape, generator=g) * scale).to(dt).to(device).contiguous()

    return g, r


def conv_update_inputs(batch, dim, K, dtype, device, seed=0):
    """x (batch, dim) in `dtype`, conv_state (batch, dim, K) fp32, weight (dim, K) and bias (dim,) in `dtype`."""
    _, r = _randn(seed, dtype, device)
    return [r(batch, dim), r(batch, dim, K, dt=torch.float32), r(dim, K, scale=0.5), r(dim, scale=0.5)]


def state_update_inputs(batch, dim, d_state, dtype, device, seed=0):
    """state (batch, dim, N) fp32, x / dt / z (batch, dim), A (dim, N) fp32, B / C (batch, N), D / dt_bias (dim,)."""
    g, r = _randn(seed, dtype, device)
    A = -torch.exp(torch.randn(dim, d_state, generator=g) * 0.5).to(device)
    return [r(batch, dim, d_state, dt=torch.float32), r(batch, dim), r(batch, dim, scale=0.5), A,
            r(batch, d_state), r(batch, d_state), r(dim), r(batch, dim), r(dim, scale=0.5)]


def add_rms_norm_inputs(rows, d, dtype, device, seed=0):
    """x (rows, d) in `dtype`, residual (rows, d) fp32, weight (d,) in `dtype`."""
    _, r = _randn(seed, dtype, device)
    return [r(rows, d), r(rows, d, dt=torch.float32), r(d, scale=0.2) + 1]


def routed_moe_inputs(tokens, d, F, experts, dtype, device, seed=0):
    """x (T, d), router_weight (E, d) scaled so logits spread, router_bias (E,), w1 (E, 2F, d), w2 (E, d, F)."""
    _, r = _randn(seed, dtype, device)
    return [r(tokens, d), r(experts, d, scale=2 * d ** -0.5), r(experts, scale=0.5),
            r(experts, 2 * F, d, scale=d ** -0.5), r(experts, d, F, scale=F ** -0.5)]


def sparse_linear_inputs(rows, K, N, dtype, device, seed=0):
    """x (rows, K) around 0.1 (the tests' mode), weight (N, K), bias (N,), all in `dtype`."""
    _, r = _randn(seed, dtype, device)
    return [r(rows, K) + 0.1, r(N, K, scale=K ** -0.5), r(N, scale=0.5)]


INPUT_MAKERS = {"SelectiveScan": selective_scan_inputs, "CausalConv1d": causal_conv1d_inputs,
                "TopKExpertGather": expert_gather_inputs, "CausalConv1dUpdate": conv_update_inputs,
                "SelectiveStateUpdate": state_update_inputs, "AddRMSNorm": add_rms_norm_inputs,
                "RoutedMoE": routed_moe_inputs, "SparseLinear": sparse_linear_inputs}
def reference(op: str, inputs, attrs):
    """The op's `_ref` on the same inputs, as a tuple of outputs in the op's output order: through the op's torch custom
    op (export/torch_ops.py), whose eager implementation is the reference and whose signature is the entry's (inputs,
    then attributes), so the attribute codes are translated in one place."""
    from ..export import torch_ops  # noqa: F401 - registers torch.ops.mambadeploy.*

    entry = get_op(op)
    attrs = entry.check_attributes(attrs)
    inputs = [x.long() if x is not None and cls == "I64" else x for x, cls in zip(inputs, entry.node_dtypes.values())]
    out = getattr(torch.ops.mambadeploy, entry.torch_op)(*inputs, *attrs.values())
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _outputs(op, inputs, attrs, device):
    """Output buffers for `inputs`, NaN-poisoned so that an element the kernel never writes shows up."""
    entry = get_op(op)
    shapes = [tuple(x.shape) for x in inputs]
    dtypes = [str(x.dtype).replace("torch.", "") for x in inputs]
    return [torch.full(s, float("nan"), dtype=TORCH_DTYPES[d], device=device)
            for s, d in zip(entry.shape_rule(tuple(shapes), attrs), entry.dtype_rule(tuple(dtypes), attrs))]


def run_interpreted(op: str, inputs, attrs, choice_shapes=None):
    """The adapter run by Triton's CPU interpreter with the AOT launch numbers (grid, scalars, constexprs chosen at
    `choice_shapes`) on CPU tensors: checks the adapter's math, strides and grid formula where no GPU is. Needs a
    process started with TRITON_INTERPRET=1 (the adapters are decorated when aot_kernels is imported)."""
    from . import aot_kernels

    spec, entry = aot.spec_for(op), get_op(op)
    adapter = getattr(aot_kernels, spec.adapter)
    if type(adapter).__name__ != "InterpretedFunction":
        raise RuntimeError("run_interpreted needs TRITON_INTERPRET=1 set before mambadeploy.plugins.aot_kernels loads")
    attrs = entry.check_attributes(attrs)
    shapes = [tuple(x.shape) for x in inputs]
    dtypes = [str(x.dtype).replace("torch.", "") for x in inputs]
    choice = aot.launch_choice(op, choice_shapes or shapes, dtypes, attrs)
    outputs = _outputs(op, inputs, attrs, "cpu")
    grid = tuple(int(g) for g in spec.grid(shapes, choice["constexprs"]))
    adapter[grid](*inputs, *[int(v) for v in spec.scalar_values(shapes)], *outputs,
                  num_warps=choice["num_warps"], **choice["constexprs"])
    return outputs


def run_aot(op: str, inputs, attrs, choice_shapes=None):
    """Launch the AOT kernel on `inputs` (CUDA tensors); returns (outputs, AotKernel)."""
    import cupy

    shapes = [tuple(x.shape) for x in inputs]
    dtypes = [str(x.dtype).replace("torch.", "") for x in inputs]
    kernel = aot.compile_for(op, shapes, dtypes, attrs, choice_shapes=choice_shapes)
    outputs = _outputs(op, inputs, attrs, inputs[0].device)
    fn = aot.load_function(cupy, kernel)
    args = aot.pack_args(kernel, [x.data_ptr() for x in inputs], [y.data_ptr() for y in outputs])
    stream = torch.cuda.current_stream().cuda_stream
    with cupy.cuda.ExternalStream(stream):
        fn(kernel.grid, kernel.block, tuple(args), shared_mem=kernel.shared_mem)
    torch.cuda.synchronize()
    return outputs, kernel
