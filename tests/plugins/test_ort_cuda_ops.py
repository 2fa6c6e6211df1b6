"""(c) The CUDA kernels of the ORT custom-op library (ops_cuda_kernels.cu) through an ORT CUDA session: every node must
be placed on the CUDA provider (CPU fallback disabled), outputs against the `_ref` on the same (rounded) inputs,
fp32/fp16/bf16, awkward shapes, omitted optional inputs. GPU only, with onnxruntime-gpu (its CUDA provider). fp16/bf16
graphs are wrapped with Casts (op_graphs.with_fp32_io) so numpy feeds them; the custom node itself runs in that dtype.
Results are appended to $MAMBADEPLOY_RESULTS_DIR/ort_cuda_ops_<gpu>.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from components import DEV_INSTALL, require_module

from mambadeploy.opset import get_op
from mambadeploy.validate.tolerances import OP

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (run on the device machine)", allow_module_level=True)
ort = require_module("onnxruntime", DEV_INSTALL)
if hasattr(ort, "preload_dlls"):
    ort.preload_dlls()
if "CUDAExecutionProvider" not in ort.get_available_providers():
    pytest.skip(f"onnxruntime {ort.__version__} has no CUDA provider (install onnxruntime-gpu)",
                allow_module_level=True)

from op_graphs import single_op_model, with_fp32_io  # noqa: E402

TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPES = list(TORCH)
RECORDS = []


@pytest.fixture(scope="module")
def library():
    from mambadeploy.plugins.ort import build

    return build.build_library(cuda=True)


PATHS = ["cuda", "aot"]  # the library's hand-written CUDA kernel, or torch-fast's Triton kernel compiled ahead of time


def _use_path(library, path, specs, size):
    """Select the kernel path for the next session runs: "aot" compiles and registers those of `specs` whose range
    holds `size` (pairs, or sequence length; Triton caches the compiles) and turns AOT launches on; "cuda" turns them
    off. The launch counters are reset."""
    from mambadeploy.plugins.ort import aot_table

    if path == "aot":
        aot_table.install(library, aot_table.compile_plan([s for s in specs if s.lo <= size <= s.hi]))
    aot_table.enable(library, path == "aot")
    aot_table.stats(library, reset=True)


def _check_path(library, path, expect_aot: bool):
    """The AOT path really launched its kernels (and no op fell back to the hand-written one)."""
    from mambadeploy.plugins.ort import aot_table

    st = aot_table.stats(library, reset=True)
    print(f"AOT stats ({path}): {st}")
    if path == "aot":
        assert st["fallbacks"] == 0, st
        assert (st["launches"] > 0) == expect_aot, st
    else:
        assert st["launches"] == 0, st


def _session(model, library):
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(library))
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")  # a node without a CUDA kernel fails here
    cuda = {"device_id": "0", "use_tf32": "0"}
    return ort.InferenceSession(model.SerializeToString(), so, providers=[("CUDAExecutionProvider", cuda)])


def _run(name, dtype, dims, seed, library, omit=(), attrs=None, **spec):
    """Build the one-node graph, run it on CUDA; returns (outputs, inputs by name as fp32 torch tensors holding the
    exact values the node saw)."""
    from onnx import numpy_helper

    model = single_op_model(name, dtype=dtype, omit=omit, attrs=attrs, **spec)
    inits = {}
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)  # bf16 comes back as ml_dtypes.bfloat16, which casts to fp32 exactly
        inits[init.name] = torch.from_numpy(arr.astype(np.float32))
    model = with_fp32_io(model)
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        shape = [dims[d.dim_param] if d.dim_param else d.dim_value for d in vi.type.tensor_type.shape.dim]
        if vi.type.tensor_type.elem_type == 7:
            feeds[vi.name] = np.stack([rng.permutation(dims["experts"])[: shape[1]] for _ in range(shape[0])]
                                      ).astype(np.int64)
        elif vi.name == "weights":
            feeds[vi.name] = rng.random(shape).astype(np.float32)
        else:
            arr = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
            if vi.name != "initial_state":  # the node sees the input rounded to its dtype
                arr = arr.to(TORCH[dtype]).float()
            feeds[vi.name] = arr.numpy()
    outs = _session(model, library).run(None, feeds)
    tensors = {**inits, **{k: torch.from_numpy(v) for k, v in feeds.items()}}
    return [torch.from_numpy(o) for o in outs], tensors


def _compare(name, dtype, case, outs, refs):
    tol = OP[TORCH[dtype]]
    record = {"op": name, "dtype": dtype, "case": case, "outputs": {}}
    RECORDS.append(record)
    for out_name, out, ref in zip(get_op(name).outputs, outs, refs):
        diff = (out.float() - ref.float()).abs()
        record["outputs"][out_name] = {"max_abs_err": diff.max().item(), "mean_abs_err": diff.mean().item()}
        print(f"{name} {dtype} {case} {out_name}: max {diff.max().item():.3e} mean {diff.mean().item():.3e}")
    for out_name, out, ref in zip(get_op(name).outputs, outs, refs):
        torch.testing.assert_close(out.float(), ref.float(), rtol=tol.rtol, atol=tol.atol,
                                   msg=lambda m, n=out_name: f"{name} {dtype} {case} {n}: {m}")
    record["ok"] = True


def _ref_inputs(t, dtype):
    """The reference takes the node's inputs in the node's dtype (T inputs rounded; fp32 ones as they are)."""
    return {k: (v.to(TORCH[dtype]) if v.is_floating_point() and k not in ("A", "initial_state", "weights", "state", "conv_state", "residual") else v)
            for k, v in t.items()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,L,dim,n,omit", [
    (1, 1, 40, 16, ()), (3, 7, 67, 16, ("D", "delta_bias")), (1, 33, 43, 4, ("initial_state",)),
    (3, 154, 130, 16, ()), (2, 600, 24, 20, ()), (1, 70, 16, 40, ("D", "delta_bias", "initial_state")),
    (1, 2100, 24, 16, ("initial_state",)),  # the long-sequence regime (128-step segments)
])
@pytest.mark.parametrize("path", PATHS)
def test_selective_scan_cuda(library, dtype, batch, L, dim, n, omit, path):
    from mambadeploy.plugins.ort import aot_table

    present = {k: k not in omit for k in ("D", "delta_bias", "initial_state")}
    _use_path(library, path, aot_table.scan_specs(dtype, n, D=present["D"], z=True, bias=present["delta_bias"],
                                                   h0=present["initial_state"], softplus=True), L)
    outs, t = _run("SelectiveScan", dtype, {"batch": batch, "length": L}, L, library, omit=omit,
                   attrs={"delta_softplus": 1}, dim=dim, n=n)
    r = _ref_inputs(t, dtype)
    refs = get_op("SelectiveScan").resolve("reference")(
        r["u"], r["delta"], r["A"], r["B"], r["C"], r.get("D"), r["z"], r.get("delta_bias"), True,
        r.get("initial_state"))
    _check_path(library, path, expect_aot=True)
    _compare("SelectiveScan", dtype, f"{path} b{batch} L{L} d{dim} N{n} omit{list(omit)}", outs, refs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,L,dim,omit,activation", [
    (1, 1, 33, (), 1), (3, 7, 130, ("bias",), 1), (3, 154, 67, ("initial_state",), 0), (2, 600, 40, (), 1),
])
@pytest.mark.parametrize("path", PATHS)
def test_causal_conv1d_cuda(library, dtype, batch, L, dim, omit, activation, path):
    from mambadeploy.plugins.ort import aot_table

    _use_path(library, path, aot_table.conv_specs(dtype, 4, bias="bias" not in omit, init="initial_state" not in omit,
                                                   silu=activation == 1), L)
    outs, t = _run("CausalConv1d", dtype, {"batch": batch, "length": L}, L, library, omit=omit,
                   attrs={"activation": activation}, dim=dim, k=4)
    r = _ref_inputs(t, dtype)
    refs = get_op("CausalConv1d").resolve("reference")(r["x"], r["weight"], r.get("bias"), r.get("initial_state"),
                                                       "silu" if activation else None)
    _check_path(library, path, expect_aot=True)
    _compare("CausalConv1d", dtype, f"{path} b{batch} L{L} d{dim} omit{list(omit)} act{activation}", outs, refs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,d,f,experts,top_k,activation", [
    (1, 24, 10, 3, 1, 0), (7, 67, 33, 4, 1, 1), (33, 130, 50, 8, 2, 0), (154, 43, 17, 4, 2, 2), (300, 96, 70, 8, 1, 0),
])
@pytest.mark.parametrize("path", PATHS)
def test_expert_gather_cuda(library, dtype, tokens, d, f, experts, top_k, activation, path):
    from mambadeploy.plugins.ort import aot_table

    _use_path(library, path, aot_table.moe_specs(dtype, d, f, experts, top_k, activation, experts_int64=True),
              tokens * top_k)
    outs, t = _run("TopKExpertGather", dtype, {"tokens": tokens, "experts": experts}, tokens, library,
                   attrs={"top_k": top_k, "activation": activation}, d=d, f=f, experts=experts, top_k=top_k)
    r = _ref_inputs(t, dtype)
    # compared relative to the output's scale: the graph's unit-normal expert weights give outputs of size ~sqrt(d F),
    # where the OP tolerance's absolute part would mean nothing
    names = {0: "gelu", 1: "silu", 2: "gelu_tanh"}
    refs = (get_op("TopKExpertGather").resolve("reference")(r["x"], r["w1"], r["w2"], r["experts"], r["weights"],
                                                            names[activation]),)
    scale = max(refs[0].float().abs().max().item(), 1.0)
    _check_path(library, path, expect_aot=tokens * top_k > 1)
    _compare("TopKExpertGather", dtype, f"{path} T{tokens} d{d} F{f} E{experts} k{top_k} act{activation}",
             [outs[0] / scale], [refs[0].float() / scale])


# --------------------------------------------------------------------------- the decode step's ops
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,dim,omit,activation", [(1, 33, (), 1), (3, 130, ("bias",), 1), (64, 2944, (), 0)])
def test_conv_update_cuda(library, dtype, batch, dim, omit, activation):
    outs, t = _run("CausalConv1dUpdate", dtype, {"batch": batch}, dim, library, omit=omit,
                   attrs={"activation": activation}, dim=dim, k=4)
    r = _ref_inputs(t, dtype)
    refs = get_op("CausalConv1dUpdate").resolve("reference")(r["x"], r["conv_state"], r["weight"], r.get("bias"),
                                                             "silu" if activation else None)
    _compare("CausalConv1dUpdate", dtype, f"b{batch} d{dim} omit{list(omit)} act{activation}", outs, refs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,dim,n,omit", [(1, 40, 16, ()), (3, 67, 5, ("D", "z", "dt_bias")), (64, 2944, 16, ())])
def test_state_update_cuda(library, dtype, batch, dim, n, omit):
    outs, t = _run("SelectiveStateUpdate", dtype, {"batch": batch}, dim, library, omit=omit,
                   attrs={"dt_softplus": 1}, dim=dim, n=n)
    r = _ref_inputs(t, dtype)
    refs = get_op("SelectiveStateUpdate").resolve("reference")(
        r["state"], r["x"], r["dt"], r["A"], r["B"], r["C"], r.get("D"), r.get("z"), r.get("dt_bias"), True)
    _compare("SelectiveStateUpdate", dtype, f"b{batch} d{dim} N{n} omit{list(omit)}", outs, refs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,K,N,omit,threshold", [(1, 37, 19, (), 0.0), (3, 1472, 331, ("bias",), 0.6),
                                                      (4, 2560, 5120, (), 0.6), (1, 64, 33, (), 100.0)])
def test_sparse_linear_cuda(library, dtype, batch, K, N, omit, threshold):
    """SCAP's SparseLinear (ops_cuda_decode_kernels.cu): threshold 0 keeps every feature, 0.6 drops ~45 % of N(0, 1)
    inputs around mode 0.1, 100 drops them all (y = bias)."""
    attrs = {"mode": 0.1, "threshold": threshold}
    outs, t = _run("SparseLinear", dtype, {"batch": batch}, K, library, omit=omit, attrs=attrs, d=K, f=N)
    r = _ref_inputs(t, dtype)
    refs = get_op("SparseLinear").resolve("reference")(r["x"], r["weight"], r.get("bias"), 0.1, threshold)
    _compare("SparseLinear", dtype, f"b{batch} K{K} N{N} omit{list(omit)} t{threshold}", outs, [refs])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,d", [(1, 33), (3, 1472), (64, 4096)])
def test_add_rms_norm_cuda(library, dtype, batch, d):
    outs, t = _run("AddRMSNorm", dtype, {"batch": batch}, d, library, attrs={"epsilon": 1e-5}, d=d)
    r = _ref_inputs(t, dtype)
    refs = get_op("AddRMSNorm").resolve("reference")(r["x"], r["residual"], r["weight"], 1e-5)
    _compare("AddRMSNorm", dtype, f"b{batch} d{d}", outs, refs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,d,f,experts,router,top_k,activation,omit", [
    (1, 24, 10, 3, "sigmoid_top1", 1, 0, ()), (5, 67, 33, 4, "softmax_topk", 1, 1, ("router_bias",)),
    (9, 128, 48, 8, "softmax_topk", 2, 1, ("router_bias",)), (64, 96, 40, 8, "sigmoid_top1", 1, 0, ()),
    (64, 130, 70, 16, "softmax_topk", 2, 2, ("router_bias",)),
    # many pairs per expert (more than one round of 4 pairs per weight read), widths multiple of 16
    (64, 128, 64, 4, "softmax_topk", 2, 1, ("router_bias",)), (40, 256, 96, 8, "sigmoid_top1", 1, 0, ()),
])
@pytest.mark.parametrize("path", PATHS)
def test_routed_moe_cuda(library, dtype, tokens, d, f, experts, router, top_k, activation, omit, path):
    from mambadeploy.opset import ROUTER_CODES
    from mambadeploy.plugins.ort import aot_table

    _use_path(library, path, aot_table.moe_specs(dtype, d, f, experts, top_k, activation, experts_int64=False),
              tokens * (1 if router == "sigmoid_top1" else top_k))

    outs, t = _run("RoutedMoE", dtype, {"tokens": tokens}, tokens, library, omit=omit,
                   attrs={"router": ROUTER_CODES[router], "top_k": top_k, "activation": activation},
                   d=d, f=f, experts=experts)
    r = _ref_inputs(t, dtype)
    names = {0: "gelu", 1: "silu", 2: "gelu_tanh"}
    ref = get_op("RoutedMoE").resolve("reference")(r["x"], r["router_weight"], r.get("router_bias"), r["w1"],
                                                   r["w2"], router, top_k, names[activation])
    # A token whose k-th and (k+1)-th router logits are within 4 units of the dtype's last place may route either
    # way (the kernel and the reference sum the logits in different orders): such rows are left out, and counted.
    logits = torch.nn.functional.linear(r["x"], r["router_weight"], r.get("router_bias")).float()
    top = logits.topk(min(top_k + 1, experts), dim=-1).values
    ulp = top[:, top_k - 1].abs() * torch.finfo(TORCH[dtype]).eps
    clear = (top[:, top_k - 1] - top[:, top_k]) > 4 * ulp
    print(f"RoutedMoE: {int((~clear).sum())} of {tokens} rows left out as near-ties")
    assert clear.float().mean() >= 0.75
    scale = max(ref.float().abs().max().item(), 1.0)  # unit-normal weights: outputs of size ~sqrt(d F)
    _check_path(library, path, expect_aot=tokens * top_k > 1)
    _compare("RoutedMoE", dtype, f"{path} T{tokens} d{d} F{f} E{experts} {router} k{top_k} act{activation}",
             [outs[0][clear] / scale], [ref.float()[clear] / scale])


def test_state_size_above_the_cuda_limit_fails_with_a_message(library):
    with pytest.raises(Exception, match="state size N = 80"):
        _run("SelectiveScan", "float32", {"batch": 1, "length": 3}, 0, library, attrs={"delta_softplus": 1},
             dim=8, n=80)


def teardown_module(module):
    out = Path(os.environ.get("MAMBADEPLOY_RESULTS_DIR",
                              Path(__file__).resolve().parents[2] / "benchmarks" / "results"))
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name().replace(" ", "_").lower()
    (out / f"ort_cuda_ops_{name}.json").write_text(json.dumps(
        {"what": "ORT CUDA custom ops (our CUDA kernels) vs _ref, single-node graphs",
         "gpu": torch.cuda.get_device_name(), "onnxruntime": ort.__version__, "cases": RECORDS}, indent=1))
