"""(a) Each plugin's kernel (SelectiveScan, CausalConv1d, TopKExpertGather) exactly as a TensorRT AOT plugin launches
it: triton.compile of the adapter with its launch config's constexprs (chosen at an engine's opt shape, launched at
other shapes), PTX loaded through the CUDA driver with CuPy, launched with the returned grid/block/shared
memory/parameter order, compared with the `_ref`. GPU only. Results (errors, kernel summaries) are written to
$MAMBADEPLOY_RESULTS_DIR (default benchmarks/results)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from mambadeploy.opset import get_op
from mambadeploy.plugins import aot
from mambadeploy.validate.tolerances import OP

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (run on the device machine)", allow_module_level=True)
cupy = pytest.importorskip("cupy", reason="CuPy loads the PTX through the CUDA driver")

from mambadeploy.plugins import aot_check  # noqa: E402  (imports torch CUDA helpers)

RECORDS = []
DTYPES = ["float32", "float16", "bfloat16"]
SCAN_CASES = [  # (batch, dim, L, d_state): L = 1, 7, 33, 154; widths off block multiples; batch 1 and 3
    (1, 40, 1, 16), (3, 40, 7, 16), (1, 43, 33, 16), (3, 67, 154, 16), (2, 130, 33, 4), (3, 43, 154, 8),
]
SCAN_OPT = {"batch": 2, "L": 64}  # the "engine's" opt shape fixing the constexprs
CONV_CASES = [  # (batch, dim, L, K, activation)
    (1, 40, 1, 4, 1), (3, 67, 7, 4, 1), (1, 43, 33, 4, 0), (3, 130, 154, 4, 1), (2, 2304, 154, 4, 1),
]
CONV_OPT = {"batch": 2, "L": 64}
GATHER_CASES = [  # (tokens, d, F, experts, top_k, activation): decode (1 token), prefill-like, d off block multiples
    (1, 40, 24, 4, 1, 0), (7, 67, 33, 3, 1, 1), (33, 130, 50, 8, 2, 0), (154, 43, 17, 4, 2, 2), (3, 1152, 384, 8, 1, 0),
]
GATHER_OPT = {"tokens": 16}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,dim,L,d_state", SCAN_CASES)
def test_selective_scan_aot_matches_ref(batch, dim, L, d_state, dtype):
    dims = {"batch": batch, "dim": dim, "L": L, "d_state": d_state}
    choice = dict(dims, **SCAN_OPT)
    _check("SelectiveScan", dims, dtype, {"delta_softplus": 1}, choice)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,dim,L,K,activation", CONV_CASES)
def test_causal_conv1d_aot_matches_ref(batch, dim, L, K, activation, dtype):
    dims = {"batch": batch, "dim": dim, "L": L, "K": K}
    _check("CausalConv1d", dims, dtype, {"activation": activation}, dict(dims, **CONV_OPT))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,d,F,experts,top_k,activation", GATHER_CASES)
def test_expert_gather_aot_matches_ref(tokens, d, F, experts, top_k, activation, dtype):
    dims = {"tokens": tokens, "d": d, "F": F, "experts": experts, "top_k": top_k}
    _check("TopKExpertGather", dims, dtype, {"activation": activation, "top_k": top_k}, dict(dims, **GATHER_OPT))


# the decode step's ops at the real decode widths (written 2026-12-02; not yet run on a GPU: the session's device time
# was spent on the ORT benchmarks)
DECODE_CASES = [  # (op, dims, attrs, the opt dims that fix the constexprs)
    ("CausalConv1dUpdate", {"batch": 1, "dim": 2944, "K": 4}, {"activation": 1}, {"batch": 8, "dim": 2944, "K": 4}),
    ("SelectiveStateUpdate", {"batch": 3, "dim": 2944, "d_state": 16}, {"dt_softplus": 1},
     {"batch": 1, "dim": 2944, "d_state": 16}),
    ("AddRMSNorm", {"rows": 3, "d": 1472}, {"epsilon": 1e-5}, {"rows": 1, "d": 1472}),
    ("RoutedMoE", {"tokens": 1, "d": 1472, "F": 96, "experts": 8}, {"router": 0, "activation": 0},
     {"tokens": 4, "d": 1472, "F": 96, "experts": 8}),
    ("RoutedMoE", {"tokens": 3, "d": 256, "F": 64, "experts": 16}, {"router": 1, "top_k": 2, "activation": 1},
     {"tokens": 4, "d": 256, "F": 64, "experts": 16}),
    ("SparseLinear", {"rows": 4, "K": 2560, "N": 5120}, {"mode": 0.1, "threshold": 0.6},  # 2.8B in_proj, half dropped
     {"rows": 1, "K": 2560, "N": 5120}),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op,dims,attrs,choice", DECODE_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(DECODE_CASES)])
def test_decode_op_aot_matches_ref(op, dims, attrs, choice, dtype):
    _check(op, dims, dtype, attrs, choice)


def test_expert_gather_aot_takes_int32_experts():
    """ONNX allows int32 or int64 expert indices ("index" type class): the kernel is compiled for the one it gets."""
    dims = {"tokens": 5, "d": 48, "F": 20, "experts": 4, "top_k": 2}
    inputs = aot_check.expert_gather_inputs(**dims, dtype="float32", device="cuda", index_dtype=torch.int32)
    (y,), kernel = aot_check.run_aot("TopKExpertGather", inputs, {"activation": 0, "top_k": 2})
    (ref,) = aot_check.reference("TopKExpertGather", inputs, {"activation": 0, "top_k": 2})
    tol = OP[torch.float32]
    print(f"int32 experts: max {(y - ref).abs().max().item():.3e}")
    torch.testing.assert_close(y, ref, rtol=tol.rtol, atol=tol.atol)


def _check(op, dims, dtype, attrs, choice_dims):
    maker = aot_check.INPUT_MAKERS[op]
    inputs = maker(**dims, dtype=dtype, device="cuda", seed=hash((op, tuple(dims.values()), dtype)) % 1000)
    choice = [tuple(x.shape) for x in maker(**choice_dims, dtype=dtype, device="meta")]
    outs, kernel = aot_check.run_aot(op, inputs, attrs, choice_shapes=choice)
    refs = aot_check.reference(op, inputs, attrs)
    tol = OP[aot_check.TORCH_DTYPES[dtype]]
    record = {"op": op, "dims": dims, "dtype": dtype, "attrs": attrs, "choice_dims": choice_dims,
              "device": torch.cuda.get_device_name(), "kernel": kernel.summary(), "outputs": {}}
    RECORDS.append(record)
    for name, out, ref in zip(get_op(op).outputs, outs, refs):
        diff = (out.float() - ref.float()).abs()
        record["outputs"][name] = {"max_abs_err": diff.max().item(), "mean_abs_err": diff.mean().item(),
                                   "all_written": bool(torch.isfinite(out.float()).all())}
        print(f"{op} {dims} {dtype} {name}: max {diff.max().item():.3e} mean {diff.mean().item():.3e} "
              f"(grid {kernel.grid}, block {kernel.block}, smem {kernel.shared_mem})")
    for name, out, ref in zip(get_op(op).outputs, outs, refs):
        assert torch.isfinite(out.float()).all(), f"{name}: unwritten (NaN-poisoned) elements remain"
        torch.testing.assert_close(out.float(), ref.float(), rtol=tol.rtol, atol=tol.atol, msg=lambda m: f"{name}: {m}")
    record["ok"] = True


def test_aot_params_follow_trt_order():
    """Inputs in op order, then int32 scalars, then outputs, then Triton's implicit (null) pointers."""
    op = "SelectiveScan"
    inputs = aot_check.selective_scan_inputs(1, 16, 8, 16, "float32", "cuda")
    _, kernel = aot_check.run_aot(op, inputs, {"delta_softplus": 1})
    kinds = [p.split(":")[0] for p in kernel.params]
    entry = get_op(op)
    n_in, n_sc, n_out = len(entry.inputs), len(aot.SPECS[op].scalars), len(entry.outputs)
    assert kinds[:n_in] == ["input"] * n_in
    assert kinds[n_in:n_in + n_sc] == ["scalar"] * n_sc
    assert kinds[n_in + n_sc:n_in + n_sc + n_out] == ["output"] * n_out
    assert set(kinds[n_in + n_sc + n_out:]) <= {"implicit"}
    assert len(kernel.params) == len(aot.ptx_params(kernel.ptx, kernel.kernel_name))


def teardown_module(module):
    out = Path(os.environ.get("MAMBADEPLOY_RESULTS_DIR", Path(__file__).resolve().parents[2] / "benchmarks" / "results"))
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name().replace(" ", "_").lower()
    (out / f"plugins_aot_{name}.json").write_text(json.dumps(
        {"what": "AOT plugin kernels launched from PTX via CuPy vs _ref", "torch": torch.__version__,
         "triton": __import__("triton").__version__, "cases": RECORDS}, indent=1))
