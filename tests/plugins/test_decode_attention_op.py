"""DecodeAttention (issue 21), one registry op in every runtime: the `_ref` (decode_attention_update_ref) against torch-fast's
Triton kernels (interpreter), our ORT CPU kernel (with present bound to the past buffer, and with ORT's own output
buffers), the portable expansion run by stock ORT, and the TensorRT plugin's three AOT launches (interpreter here;
compiled to sm_90 PTX and assembled). Awkward shapes: odd cache lengths, fills of 1 and S, batch 1 and 3, GQA and MHA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from components import DEV_INSTALL, require_module

from mambadeploy.kernels.decode_attention import decode_attention_update, decode_attention_update_ref
from mambadeploy.validate.tolerances import op_checker

ort = require_module("onnxruntime", DEV_INSTALL)
require_module("triton", DEV_INSTALL)

from op_graphs import ONNX_DTYPES

HERE = Path(__file__).resolve().parent
DTYPES = ["float32", "float16", "bfloat16"]
# (batch, heads, kv_heads, head_dim, slots, pos per row): pos 0 is a fill of 1, pos S-1 a full cache
CASES = {
    "gqa-b3-S37": (3, 4, 2, 12, 37, [0, 36, 17]),
    "mha-b1-S5-full": (1, 3, 3, 16, 5, [4]),
    "mha-b1-S33-fill1": (1, 2, 2, 8, 33, [0]),
    "gqa-b3-S131-splits": (3, 8, 2, 20, 131, [130, 0, 64]),  # several splits, one of them empty for row 1
}


def _inputs(case, dtype, seed=0):
    B, H, KV, hd, S, pos = CASES[case]
    g = torch.Generator().manual_seed(seed)
    t = getattr(torch, dtype)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(t)

    return [r(B, H, hd), r(B, KV, hd), r(B, KV, hd), r(B, KV, S, hd), r(B, KV, S, hd), torch.tensor(pos)]


def _check(outs, refs, dtype, op, what):
    check = op_checker(op)
    for name, out, ref in zip(("out", "present_key", "present_value"), outs, refs):
        assert out.shape == ref.shape and out.dtype == ref.dtype, name
        check(out, ref, getattr(torch, dtype), f"{what} {name}")


def _model(case, dtype):
    """One DecodeAttention node, every input a graph input."""
    from onnx import TensorProto, helper

    from mambadeploy.opset import DOMAIN, get_op

    B, H, KV, hd, S, _ = CASES[case]
    entry, t = get_op("DecodeAttention"), ONNX_DTYPES[dtype]
    shapes = [[B, H, hd], [B, KV, hd], [B, KV, hd], [B, KV, S, hd], [B, KV, S, hd]]
    inputs = [helper.make_tensor_value_info(n, t, s) for n, s in zip(entry.inputs, shapes)]
    inputs.append(helper.make_tensor_value_info("pos", TensorProto.INT64, [B]))
    outputs = [helper.make_tensor_value_info(n, t, s) for n, s in zip(entry.outputs, shapes[:1] + shapes[3:])]
    node = helper.make_node("DecodeAttention", list(entry.inputs), list(entry.outputs), domain=DOMAIN, scale=0.0)
    graph = helper.make_graph([node], "decode_attention", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 10  # opset 21's IR; the newest onnx writes 14, which onnxruntime-gpu 1.31 refuses (max 13)
    return model


_ELEMENT_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.bfloat16: 16}


def _bind(io, kind, name, tensor):
    """Bind a contiguous CPU tensor by address (bf16 has no numpy type: ORT takes its ONNX type number)."""
    bind = io.bind_input if kind == "input" else io.bind_output
    bind(name, "cpu", 0, _ELEMENT_TYPES[tensor.dtype], list(tensor.shape), tensor.data_ptr())


def _run_ort(model, inputs, dtype, library=None, alias=False):
    """Run with IO binding; alias: present_* bound to the past caches' own buffers (what OrtRunner does), which the op
    then updates in place."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if library is not None:
        so.register_custom_ops_library(str(library))
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    inputs = [x.clone() for x in inputs]  # the caller's tensors stay as they were
    io = sess.io_binding()
    for name, x in zip(("q", "k", "v", "key_cache", "value_cache", "pos"), inputs):
        _bind(io, "input", name, x)
    outs = [torch.empty_like(inputs[0])] + ([inputs[3], inputs[4]] if alias else [torch.empty_like(x) for x in inputs[3:5]])
    for name, x in zip(("out", "present_key", "present_value"), outs):
        _bind(io, "output", name, x)
    sess.run_with_iobinding(io)
    return outs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_triton_kernels_match_ref_and_write_in_place(case, dtype):
    inputs = _inputs(case, dtype)
    refs = decode_attention_update_ref(*inputs)
    caches = [x.clone() for x in inputs[3:5]]
    outs = decode_attention_update(*inputs[:3], *caches, inputs[5])
    assert outs[1] is caches[0] and outs[2] is caches[1]  # present IS the cache (the op's aliasing)
    _check(outs, refs, dtype, "decode_attention", f"triton {case}")


@pytest.mark.parametrize("alias", [True, False], ids=["present-is-past", "ort-buffers"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_ort_cpu_kernel_matches_ref(library, case, dtype, alias):
    inputs = _inputs(case, dtype, seed=1)
    refs = decode_attention_update_ref(*inputs)
    outs = _run_ort(_model(case, dtype), inputs, dtype, library, alias)
    _check(outs, refs, dtype, "ort_decode_ops", f"ort-cpu {case}")
    # the slots past each row's fill are never read: poisoning them changes nothing
    poisoned = [x.clone() for x in inputs]
    for b, p in enumerate(CASES[case][5]):
        poisoned[3][b, :, p + 1:] = float("nan")
        poisoned[4][b, :, p + 1:] = float("nan")
    again = _run_ort(_model(case, dtype), poisoned, dtype, library, alias)
    assert torch.equal(again[0], outs[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_portable_expansion_matches_ref(case, dtype):
    from mambadeploy.export.portable import expand_custom_nodes

    model = _model(case, dtype)
    assert expand_custom_nodes(model) == 1 and not any(n.domain for n in model.graph.node)
    inputs = _inputs(case, dtype, seed=2)
    outs = _run_ort(model, inputs, dtype)
    _check(outs, decode_attention_update_ref(*inputs), dtype, "onnx_portable", f"portable {case}")


def test_ort_kernel_refuses_a_position_outside_the_cache(library):
    inputs = _inputs("mha-b1-S5-full", "float32")
    inputs[5] = torch.tensor([5])
    with pytest.raises(Exception, match="pos outside the cache"):
        _run_ort(_model("mha-b1-S5-full", "float32"), inputs, "float32", library)


# --------------------------------------------------------------------------- the TensorRT plugin's launches
@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Every case through aot_attention.run_interpreted in one TRITON_INTERPRET=1 subprocess (the adapters must be
    decorated with the interpreter on), aliased (present written into the past caches) and not (copied first)."""
    out = tmp_path_factory.mktemp("attn_interp") / "results.pt"
    script = (
        "import sys, json, torch\n"
        "from mambadeploy.plugins import aot_attention\n"
        "from test_decode_attention_op import _inputs\n"
        "res = {}\n"
        "for case, dtype, alias in json.loads(sys.argv[1]):\n"
        "    inputs = _inputs(case, dtype, seed=3)\n"
        "    mine = [x.clone() for x in inputs]\n"
        "    outs = aot_attention.run_interpreted(mine, {'scale': 0.0}, alias=alias)\n"
        "    same = [outs[1].data_ptr() == mine[3].data_ptr(), outs[2].data_ptr() == mine[4].data_ptr()]\n"
        "    res[f'{case}-{dtype}-{alias}'] = {'inputs': inputs, 'outputs': list(outs), 'aliased': same}\n"
        "torch.save(res, sys.argv[2])\n")
    jobs = [(c, d, a) for c in CASES for d in ("float32", "bfloat16") for a in (True, False)]
    path = [str(HERE.parents[1]), str(HERE.parent), str(HERE)]  # the package, tests/ (components), tests/plugins
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(path))
    r = subprocess.run([sys.executable, "-c", script, json.dumps(jobs), str(out)], env=env, capture_output=True,
                       text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("alias", [True, False], ids=["aliased", "copied"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES))
def test_trt_plugin_launches_match_ref_in_interpreter(interpreted, case, dtype, alias):
    got = interpreted[f"{case}-{dtype}-{alias}"]
    assert got["aliased"] == [alias, alias]
    _check(got["outputs"], decode_attention_update_ref(*got["inputs"]), dtype, "aot_interpreted", f"trt {case}")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_trt_plugin_launches_compile_for_sm90(dtype, tmp_path):
    """The three adapters compile to PTX for sm_90 with pointer/scalar parameters only (scratch stripped), at the plan's
    launch numbers, and the PTX assembles (Triton's bundled ptxas)."""
    from mambadeploy.plugins import aot, aot_attention

    shapes = [(2, 32, 128), (2, 8, 128), (2, 8, 128), (2, 8, 4096, 128), (2, 8, 4096, 128), (2,)]
    kernels = aot_attention.compile_launches(shapes, [dtype] * 5 + ["int64"], {"scale": 0.0}, arch=90)
    assert [k.grid for k in kernels] == [(2, 8, 1), (2, 8, 16), (2, 32, 1)]  # 256 programs: 16 splits per KV head
    ptxas = Path(require_module("triton", DEV_INSTALL).__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell"
    for k in kernels:
        assert all(p.split(":")[0] in ("ptr", "scalar") for p in k.params), k.params
        assert len(aot.ptx_params(k.ptx, k.kernel_name)) == len(k.params)
        if ptxas.exists():
            (tmp_path / "k.ptx").write_text(k.ptx)
            r = subprocess.run([str(ptxas), "-arch=sm_90a", str(tmp_path / "k.ptx"), "-o", str(tmp_path / "k.cubin")],
                               capture_output=True, text=True, check=False)
            assert r.returncode == 0, r.stderr
    assert aot_attention.workspace_bytes(shapes) >= 2 * 32 * 16 * 128 * 4  # the fp32 partials fit


def test_ort_cpu_step_with_present_bound_to_past_does_not_touch_the_whole_cache(library):
    """The aliasing is real: with present bound to the past buffers, a step at fill 11 of a 64 MiB-per-cache Jamba-shaped
    cache takes a small fraction of the step whose outputs ORT allocates (that one copies each cache; measured here
    0.04 ms vs 57 ms at 256 MiB)."""
    import time

    CASES["jamba-16k"] = (1, 32, 8, 128, 16384, [10])
    try:
        inputs, model = _inputs("jamba-16k", "float32"), _model("jamba-16k", "float32")
    finally:
        del CASES["jamba-16k"]
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(library))
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    times = {}
    for alias in (True, False):
        outs = [torch.empty_like(inputs[0])] + (inputs[3:5] if alias else [torch.empty_like(x) for x in inputs[3:5]])
        io = sess.io_binding()
        for name, x in zip(("q", "k", "v", "key_cache", "value_cache", "pos"), inputs):
            _bind(io, "input", name, x)
        for name, x in zip(("out", "present_key", "present_value"), outs):
            _bind(io, "output", name, x)
        sess.run_with_iobinding(io)
        start = time.perf_counter()
        for _ in range(3):
            sess.run_with_iobinding(io)
        times["aliased" if alias else "copied"] = (time.perf_counter() - start) / 3
    print({k: f"{v * 1e3:.3f} ms" for k, v in times.items()})
    assert times["aliased"] * 10 < times["copied"]
