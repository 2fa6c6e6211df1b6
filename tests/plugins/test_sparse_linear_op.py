"""SparseLinear (issue 18: SCAP in the decode graph), one registry op in the runtimes it has: the `_ref`
(sparse_linear_ref) against torch-fast's sparse_gemv_kernel (interpreter), our ORT CPU kernel and the portable
expansion run by stock ORT; then a calibrated blackmamba-tiny exported with --ops custom, run by ORT CPU with our
library, against the sparse reference. Awkward K / N, batch 1, 3 and 5 (two launches of the 4-row kernel), sparsity 0,
0.5 and 1 (every feature dropped: y = b)."""

from __future__ import annotations

from collections import Counter

import onnx
import pytest
import torch
from components import DEV_INSTALL, require_module
from onnx import helper

from mambadeploy.kernels.sparse_gemv import sparse_linear, sparse_linear_ref
from mambadeploy.opset import DOMAIN, get_op
from mambadeploy.validate.tolerances import assert_logits_close, op_checker

ort = require_module("onnxruntime", DEV_INSTALL)
require_module("triton", DEV_INSTALL)

from op_graphs import ONNX_DTYPES, with_fp32_io  # noqa: E402 (tests/plugins is on sys.path)

DTYPES = ["float32", "float16", "bfloat16"]
# rows (leading dims of x), K, N, with bias
CASES = {"b1-K37-N19-bias": ((1,), 37, 19, True), "b3-K64-N33": ((3,), 64, 33, False),
         "b5-K20-N7-bias": ((5,), 20, 7, True)}
SPARSITY = [0.0, 0.5, 1.0]
MODE = 0.25  # a mode-centred site: the shift is what the folded bias compensates


def _inputs(case, dtype, sparsity, seed=0):
    """x, weight, bias (or None) in `dtype` and the threshold that drops `sparsity` of |x - MODE| (1.0: all of it)."""
    rows, K, N, has_bias = CASES[case]
    g = torch.Generator().manual_seed(seed)
    t = getattr(torch, dtype)
    x = (torch.randn(*rows, K, generator=g) + MODE).to(t)
    weight = torch.randn(N, K, generator=g).to(t)
    bias = torch.randn(N, generator=g).to(t) if has_bias else None
    centred = (x.float() - MODE).abs().flatten()
    threshold = 0.0 if sparsity == 0 else (centred.max().item() + 1.0 if sparsity == 1 else
                                           centred.quantile(sparsity).item())
    return x, weight, bias, threshold


def _dropped(x, threshold):
    return ((x.float() - MODE).abs() <= threshold).float().mean().item()


def _node_model(case, dtype, threshold):
    """One SparseLinear node, every input a graph input; fp32 graph IO (Casts around it) so numpy feeds bf16."""
    rows, K, N, has_bias = CASES[case]
    t = ONNX_DTYPES[dtype]
    names = ["x", "weight"] + (["bias"] if has_bias else [])
    shapes = {"x": [*rows, K], "weight": [N, K], "bias": [N]}
    inputs = [helper.make_tensor_value_info(n, t, shapes[n]) for n in names]
    outputs = [helper.make_tensor_value_info("y", t, [*rows, N])]
    node = helper.make_node("SparseLinear", names, ["y"], domain=DOMAIN, mode=MODE, threshold=threshold)
    graph = helper.make_graph([node], "sparse_linear", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 10
    return with_fp32_io(model)


def _run_ort(model, x, weight, bias, library=None):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if library is not None:
        so.register_custom_ops_library(str(library))
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {"x": x.float().numpy(), "weight": weight.float().numpy()}
    if bias is not None:
        feeds["bias"] = bias.float().numpy()
    return torch.from_numpy(sess.run(None, feeds)[0]).to(x.dtype)


@pytest.mark.parametrize("sparsity", SPARSITY)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_triton_ort_cpu_and_portable_match_ref(library, case, dtype, sparsity):
    from mambadeploy.export.portable import expand_custom_nodes

    x, weight, bias, threshold = _inputs(case, dtype, sparsity)
    assert _dropped(x, threshold) == pytest.approx(sparsity, abs=0.06)
    ref = sparse_linear_ref(x, weight, bias, MODE, threshold)
    assert ref.shape == (*x.shape[:-1], weight.shape[0]) and ref.dtype == x.dtype
    if sparsity == 1.0:  # every activation dropped: only the bias is left
        assert torch.equal(ref, (bias if bias is not None else torch.zeros(())).expand_as(ref).to(x.dtype))
    t = getattr(torch, dtype)
    op_checker("sparse_gemv")(sparse_linear(x, weight, bias, MODE, threshold), ref, t, f"triton {case}")
    op_checker("ort_decode_ops")(_run_ort(_node_model(case, dtype, threshold), x, weight, bias, library), ref, t,
                                 f"ort-cpu {case}")
    portable = _node_model(case, dtype, threshold)
    assert expand_custom_nodes(portable) == 1 and not any(n.domain for n in portable.graph.node)
    op_checker("onnx_portable")(_run_ort(portable, x, weight, bias), ref, t, f"portable {case}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_ort_kernel_never_reads_the_weights_of_dropped_features(library, dtype):
    """SCAP's point: NaN in every weight column of a dropped feature (dropped in every row) changes nothing."""
    x, weight, bias, threshold = _inputs("b3-K64-N33", dtype, 0.5, seed=3)
    dropped_everywhere = ((x.float() - MODE).abs() <= threshold).reshape(-1, x.shape[-1]).all(0)
    assert dropped_everywhere.any()
    model = _node_model("b3-K64-N33", dtype, threshold)
    clean = _run_ort(model, x, weight, bias, library)
    poisoned = weight.clone()
    poisoned[:, dropped_everywhere] = float("nan")
    assert torch.equal(_run_ort(model, x, poisoned, bias, library), clean)


def test_ort_kernel_refuses_a_weight_of_the_wrong_width(library):
    x, weight, bias, threshold = _inputs("b1-K37-N19-bias", "float32", 0.5)
    model = _node_model("b1-K37-N19-bias", "float32", threshold)
    for vi in model.graph.input:  # no declared shapes: ORT hands the wrong one to our kernel's registry check
        vi.type.tensor_type.ClearField("shape")
    with pytest.raises(Exception, match=r"SparseLinear: input weight has shape \[19, 36\], not \(N, K\)"):
        _run_ort(model, x, weight[:, :-1], bias, library)


# --------------------------------------------------------------------------- a calibrated model, --ops custom
def test_sparse_custom_export_matches_the_sparse_reference_on_ort_cpu(tmp_path, library):
    from mambadeploy.export.exporter import export_model
    from mambadeploy.models.calibrate import calibrate, windows_from_tokens
    from mambadeploy.models.checkpoint import load_model
    from mambadeploy.runtime.ort_runner import OrtRunner

    tokens = torch.randint(0, 512, (3000,), generator=torch.Generator().manual_seed(0))
    sparse = calibrate(load_model("blackmamba-tiny"), windows_from_tokens(tokens, 4, 32), 0.5, mode="median")
    export_model(sparse, tmp_path / "x", ops="custom", force=True)
    decode = onnx.load(tmp_path / "x" / "decode.onnx", load_external_data=False)
    ops = Counter(n.op_type for n in decode.graph.node if n.domain == DOMAIN)
    mixers = [layer.mixer for layer in sparse.layers if layer.mixer is not None]
    mamba_linears = sum(len(m.sparse) for m in mixers if m.sparse is not None)
    assert mamba_linears and ops["SparseLinear"] == mamba_linears  # in_proj, x_proj, out_proj of each Mamba layer
    attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in decode.graph.node
             if n.op_type == "SparseLinear"]
    assert all(a["threshold"] > 0 for a in attrs) and any(a["mode"] != 0 for a in attrs)
    assert get_op("SparseLinear").version == 1
    runner = OrtRunner(tmp_path / "x")
    ids = torch.randint(0, 512, (3, 7), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([7, 4, 6])
    ref, state = sparse.prefill(ids, lengths)
    got, ort_state = runner.prefill(ids, lengths)
    assert_logits_close(torch.as_tensor(got), ref, what="sparse prefill, --ops custom", check="ort_custom")
    for step in range(16):
        token = ref.argmax(-1)
        ref, state = sparse.step(token, state)
        got, ort_state = runner.step(token, ort_state)
        got = torch.as_tensor(got)
        assert_logits_close(got, ref, what=f"sparse decode step {step}, --ops custom", check="ort_custom")
        assert torch.equal(got.argmax(-1), ref.argmax(-1)), f"greedy token differs at step {step}"
