"""Every kernel launch the wrappers make compiles for sm_90 (H100) with triton.compile — no GPU needed. The CPU
interpreter accepts code that the compiler refuses (non-constexpr globals, a variable redefined with another shape
inside an `if`), so this catches in CI what only the GPU run would show otherwise.

The wrappers are called with small CPU tensors and a recorder in place of the kernel launch; each recorded launch
(GPU launch config: grid, num_warps, num_stages, constexprs) is then compiled."""

from __future__ import annotations

import pytest
import torch
from components import DEV_INSTALL, require_module

triton = require_module("triton", DEV_INSTALL)
from triton.backends.compiler import GPUTarget  # noqa: E402

from mambadeploy.kernels import (  # noqa: E402
    causal_conv1d,
    gemv,
    moe_experts,
    moe_routing,
    rms_norm,
    selective_scan,
    selective_state_update,
    sparse_gemv_compact,
)

MODULES = (causal_conv1d, gemv, moe_experts, moe_routing, rms_norm, selective_scan, selective_state_update,
           sparse_gemv_compact)
H100_SMEM_PER_BLOCK = 232448  # bytes of shared memory one block may use on sm_90 (Triton's own error names it)
POINTER = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int64: "*i64",
           torch.int32: "*i32"}


class _Recorder:
    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def _record(monkeypatch, call) -> list:
    launches: list = []
    for module in MODULES:
        monkeypatch.setattr(module, "kernel_for", lambda kernel, tensor: _Recorder(kernel, launches))
    call()
    return launches


def _compile(kernel, args, kwargs):
    options = {"num_warps": kwargs.pop("num_warps"), "num_stages": kwargs.pop("num_stages"),
               "launch_pdl": kwargs.pop("launch_pdl", False)}
    values = dict(zip(kernel.arg_names, args), **kwargs)
    signature, constexprs = {}, {}
    for param in kernel.params:  # a parameter not passed takes its default (PDL, the fused-conv arguments)
        v = values[param.name] if param.name in values else param.default
        if param.is_constexpr or v is None:  # (Triton specialises None arguments as constexprs too)
            signature[param.name], constexprs[param.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[param.name] = POINTER[v.dtype]
        elif type(v).__name__ == "TensorDescriptor":  # host-built TMA descriptor (the prefill grouped GEMM)
            signature[param.name] = f"tensordesc<{POINTER[v.base.dtype][1:]}[{', '.join(map(str, v.block_shape))}]>"
        elif isinstance(v, float):
            signature[param.name] = "fp32"
        else:
            signature[param.name] = "i32"
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    # the launch would fail with "out of resource: shared memory" on the H100 (the compile itself does not check)
    assert compiled.metadata.shared <= H100_SMEM_PER_BLOCK, (kernel.fn.__name__, compiled.metadata.shared)
    return compiled


def _calls(dtype):
    r = lambda *s: torch.randn(*s).to(dtype)  # noqa: E731
    b, d, L, N, K, T, E, F = 1, 40, 133, 16, 4, 3, 4, 24  # L over a scan segment: both scan passes
    yield "selective_scan", lambda: selective_scan.selective_scan(
        r(b, d, L), r(b, d, L), -torch.rand(d, N), r(b, N, L), r(b, N, L), torch.randn(d), r(b, d, L), torch.randn(d),
        True, torch.randn(b, d, N))
    yield "selective_state_update", lambda: selective_state_update.selective_state_update(
        torch.randn(b, d, N), r(b, d), r(b, d), -torch.rand(d, N), r(b, N), r(b, N), torch.randn(d), r(b, d),
        torch.randn(d))
    yield "selective_state_update (dt_proj fused)", lambda: selective_state_update.selective_state_update(
        torch.randn(b, d, N), r(b, d), r(b, 5), -torch.rand(d, N), r(b, N), r(b, N), torch.randn(d), r(b, d),
        torch.randn(d), True, dt_proj_weight=r(d, 5))
    yield "causal_conv1d", lambda: causal_conv1d.causal_conv1d(r(b, d, L), r(d, K), r(d), torch.randn(b, d, K), "silu")
    yield "causal_conv1d_update", lambda: causal_conv1d.causal_conv1d_update(r(b, d), torch.randn(b, d, K), r(d, K),
                                                                              r(d), "silu")
    yield "add_rms_norm", lambda: rms_norm.add_rms_norm(r(T, d), torch.randn(T, d), r(d), 1e-5)
    yield "route_hidden", lambda: moe_routing.route_hidden(r(T, d), r(E, d), r(E), "softmax_topk", 2)
    yield "add_rms_norm_route", lambda: moe_routing.add_rms_norm_route(r(T, d), torch.randn(T, d), r(d), 1e-5,
                                                                       r(E, d), r(E), "sigmoid_top1", 1)
    one = torch.randint(0, E, (1, 1))  # a single (token, expert) pair: the GEMV launch
    yield "expert_gather (gemv)", lambda: moe_experts.expert_gather(r(1, d), r(E, 2 * F, d), r(E, d, F), one,
                                                                     torch.rand(1, 1), "gelu")
    experts = torch.randint(0, E, (40, 2))
    yield "expert_gather (gemm)", lambda: moe_experts.expert_gather(r(40, d), r(E, 2 * F, d), r(E, d, F), experts,
                                                                     torch.rand(40, 2), "silu")
    tma_shapes = ((80, d), (E, 2 * F, d), (E, d, F), (80, 1), (80, 1))  # prefill-sized: the TMA grouped GEMM
    yield "expert_gather (gemm, TMA)", lambda: moe_experts.expert_gather(
        r(80, d), r(E, 2 * F, d), r(E, d, F), torch.randint(0, E, (80, 1)), torch.rand(80, 1), "gelu",
        config=moe_experts.launch_config(tma_shapes, (dtype,), tma=True))
    # dense decode projections: in_proj-like (no split), x_proj-like (split-K with arrival counters), batch 8 + bias
    yield "gemv", lambda: gemv.gemv(r(1, 1472), r(5888, 1472))
    yield "gemv (split-K)", lambda: gemv.gemv(r(1, 2944), r(124, 2944))
    yield "gemv (batch 8, bias)", lambda: gemv.gemv(r(8, 2944), r(1472, 2944), r(1472))
    yield "gemv (L2 prefetch)", lambda: gemv.gemv(r(1, 2944), r(124, 2944), prefetch=(r(1472, 2944), 1472 * 2944 * 2))
    yield "gemv (in_proj + conv)", lambda: gemv.gemv(r(1, 1472), r(5888, 1472), None,
                                                     conv=(torch.randn(1, 2944, 4), r(2944, 4), r(2944)))
    yield "gemv (SCAP-sparsified in_proj + conv)", lambda: gemv.gemv(
        r(1, 1472), r(5888, 1472), r(5888), conv=(torch.randn(1, 2944, 4), r(2944, 4), r(2944)), sparsify=(0.1, 0.5))
    yield "expert_gather (gemv, SCAP-sparsified)", lambda: moe_experts.expert_gather(
        r(1, d), r(E, 2 * F, d), r(E, d, F), one, torch.rand(1, 1), "gelu",
        sparse=((0.1, 0.5, r(E, 2 * F)), (0.0, 0.2, None)))
    yield "expert_gather (gemm, SCAP-sparsified)", lambda: moe_experts.expert_gather(
        r(4, d), r(E, 2 * F, d), r(E, d, F), torch.randint(0, E, (4, 1)), torch.rand(4, 1), "gelu",
        sparse=((0.1, 0.5, r(E, 2 * F)), (0.0, 0.2, r(E, d))))
    # the compacting SCAP GEMV at the 2.8B expert sites (batch 1: gated fc1, routing-scaled fc2; batch 4 pairs)
    yield "compact expert fc1", lambda: sparse_gemv_compact.sparse_expert_gemv(
        r(1, 1472), r(E, 1472, 2 * 3872), torch.tensor([1]), 0.0, 0.5, activation="gelu")
    yield "compact expert fc2", lambda: sparse_gemv_compact.sparse_expert_gemv(
        r(1, 3872), r(E, 3872, 1472), torch.tensor([2]), 0.0, 0.5, scale=torch.rand(1))
    yield "compact expert fc1 (4 pairs)", lambda: sparse_gemv_compact.sparse_expert_gemv(
        r(4, 1472), r(E, 1472, 2 * 3872), torch.tensor([0, 3, 1, 1]), 0.0, 0.5, activation="gelu")
    from mambadeploy.runtime.fast_sparse import EXPERT_TILES  # the tiles torch-fast launches them with on a GPU

    yield "compact expert fc1 (runner tiles)", lambda: sparse_gemv_compact.sparse_expert_gemv(
        r(1, 1472), r(E, 1472, 2 * 3872), torch.tensor([1]), 0.0, 0.5, activation="gelu", tiles=EXPERT_TILES["fc1"])
    yield "compact expert fc2 (runner tiles)", lambda: sparse_gemv_compact.sparse_expert_gemv(
        r(4, 3872), r(E, 3872, 1472), torch.tensor([2, 0, 1, 3]), 0.0, 0.5, scale=torch.rand(4),
        tiles=EXPERT_TILES["fc2"])
    yield "compact in_proj + conv", lambda: sparse_gemv_compact.sparse_gemv(
        r(1, 1472), r(1472, 5888), 0.0, 0.5, r(5888), conv=(torch.randn(1, 2944, 4), r(2944, 4), r(2944)))


def test_every_launch_compiles_for_sm90(monkeypatch):
    compiled = set()
    for what, call in _calls(torch.bfloat16):
        for kernel, args, kwargs in _record(monkeypatch, call):
            _compile(kernel, args, dict(kwargs))
            compiled.add(kernel.fn.__name__)
    print(sorted(compiled))
    assert len(compiled) == 17  # every kernel of the package


PDL_CALLS = ("selective_state_update", "selective_state_update (dt_proj fused)", "causal_conv1d_update", "add_rms_norm", "add_rms_norm_route",
             "expert_gather (gemv)", "gemv", "gemv (split-K)", "gemv (batch 8, bias)", "gemv (in_proj + conv)",
             "gemv (SCAP-sparsified in_proj + conv)", "expert_gather (gemv, SCAP-sparsified)")


def test_decode_kernels_compile_with_programmatic_dependent_launch(monkeypatch):
    """What an sm_90 GPU launches in decode: every decode kernel with PDL on (grid-dependency wait / launch)."""
    pdl = {"PDL": True, "launch_pdl": True}
    for module in MODULES:
        if hasattr(module, "pdl_launch"):
            monkeypatch.setattr(module, "pdl_launch", lambda tensor: dict(pdl))
    calls = dict(_calls(torch.bfloat16))
    compiled = set()
    for what in PDL_CALLS:
        for kernel, args, kwargs in _record(monkeypatch, calls[what]):
            assert kwargs.get("PDL") is True, f"{what}: {kernel.fn.__name__} launched without PDL"
            ptx = _compile(kernel, args, dict(kwargs)).asm["ptx"]
            assert "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx, kernel.fn.__name__
            compiled.add(kernel.fn.__name__)
    print(sorted(compiled))
    assert len(compiled) == 7


WAIT_FIRST_CALLS = ("compact expert fc1", "compact expert fc2", "compact expert fc1 (4 pairs)",
                    "compact expert fc1 (runner tiles)", "compact expert fc2 (runner tiles)", "compact in_proj + conv")


def test_sparse_expert_kernels_read_nothing_before_the_pdl_wait(monkeypatch):
    """The crash of the first compacting GEMV (674d32b, an illegal address in the graphed 2.8B step): it loaded the
    expert id before griddepcontrol.wait, while under PDL the router kernel that writes it may still be running.
    In the sm_90 PTX of every compacting launch, no global load may come before the wait."""
    monkeypatch.setattr(sparse_gemv_compact, "pdl_launch", lambda tensor: {"PDL": True, "launch_pdl": True})
    calls = dict(_calls(torch.bfloat16))
    for what in WAIT_FIRST_CALLS:
        (kernel, args, kwargs), = _record(monkeypatch, calls[what])
        lines = [line.strip() for line in _compile(kernel, args, dict(kwargs)).asm["ptx"].splitlines()]
        wait = next(i for i, line in enumerate(lines) if line.startswith("griddepcontrol.wait"))
        early = [line for line in lines[:wait] if line.startswith("ld.global")]
        print(what, "global loads before the wait:", early)
        assert not early, f"{what}: {early}"


def test_l2_prefetch_compiles_to_the_bulk_prefetch(monkeypatch):
    """What the x_proj GEMV launches on sm_90 with its L2 prefetch site: Hopper's cp.async.bulk.prefetch.L2."""
    from mambadeploy.kernels import common

    monkeypatch.setattr(gemv, "l2_prefetch_args", common.l2_prefetch_split)  # as on an sm_90 GPU
    calls = dict(_calls(torch.bfloat16))
    (kernel, args, kwargs), = _record(monkeypatch, calls["gemv (L2 prefetch)"])
    assert kwargs.get("PREFETCH") is True
    ptx = _compile(kernel, args, dict(kwargs)).asm["ptx"]
    assert "cp.async.bulk.prefetch.L2.global" in ptx


def test_fp32_grouped_gemm_compiles_for_sm90(monkeypatch):
    """fp32 takes tl.dot's exact ("ieee") path, a different lowering from bf16's."""
    calls = dict(_calls(torch.float32))
    for kernel, args, kwargs in _record(monkeypatch, calls["expert_gather (gemm)"]):
        _compile(kernel, args, dict(kwargs))
