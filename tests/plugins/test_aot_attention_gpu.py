"""DecodeAttention's TensorRT enqueue without TensorRT (none runs on the H200): plugins/aot_attention.enqueue on raw
device pointers — the three AOT-compiled launches loaded through the CUDA driver (CuPy) on a torch stream, with a
workspace of workspace_bytes — against the `_ref` and against torch-fast's JIT launch of the same kernels, with present
aliased to the past caches (what the plugin declares) and not (the enqueue copies each cache first). GPU only.

    PYTHONPATH=$PWD:$PWD/tests/plugins python3 -m pytest -q tests/plugins/test_aot_attention_gpu.py -s"""

from __future__ import annotations

import pytest
import torch

from mambadeploy.kernels.decode_attention import decode_attention_update, decode_attention_update_ref
from mambadeploy.validate.tolerances import assert_close_op

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (run on the device machine)", allow_module_level=True)
pytest.importorskip("cupy", reason="CuPy loads the PTX through the CUDA driver")

from mambadeploy.plugins import aot_attention

# (batch, heads, kv_heads, head_dim, slots, pos): jamba-tiny's heads, Jamba's (32 on 8, hd 128) at a long cache
CASES = [(3, 4, 2, 12, 37, [0, 36, 17]), (1, 3, 3, 16, 5, [4]), (2, 32, 8, 128, 4099, [4098, 0]),
         (1, 32, 8, 128, 65536, [40000])]


def _inputs(B, H, KV, hd, S, pos, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, device="cuda").to(dtype)

    return [r(B, H, hd), r(B, KV, hd), r(B, KV, hd), r(B, KV, S, hd), r(B, KV, S, hd),
            torch.tensor(pos, device="cuda")]


def _enqueue(inputs, alias, kernels=None):
    shapes = [tuple(x.shape) for x in inputs]
    dtypes = [str(x.dtype).removeprefix("torch.") for x in inputs]
    kernels = kernels or aot_attention.compile_launches(shapes, dtypes, {"scale": 0.0})
    workspace = torch.empty(aot_attention.workspace_bytes(shapes), dtype=torch.uint8, device="cuda")
    out = torch.empty_like(inputs[0])
    present = inputs[3:5] if alias else [torch.empty_like(x) for x in inputs[3:5]]
    stream = torch.cuda.current_stream()
    aot_attention.enqueue(kernels, [x.data_ptr() for x in inputs], [out.data_ptr()] + [p.data_ptr() for p in present],
                          workspace.data_ptr(), shapes, dtypes[0], stream.cuda_stream)
    stream.synchronize()
    return out, *present


@pytest.mark.parametrize("alias", [True, False], ids=["aliased", "copied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-H{c[1]}-KV{c[2]}-hd{c[3]}-S{c[4]}")
def test_plugin_enqueue_matches_ref_and_torch_fast(case, dtype, alias):
    inputs = _inputs(*case, dtype)
    refs = decode_attention_update_ref(*inputs)
    fast = decode_attention_update(*inputs[:3], *[x.clone() for x in inputs[3:5]], inputs[5])
    mine = [x.clone() for x in inputs]
    got = _enqueue(mine, alias)
    if alias:
        assert got[1].data_ptr() == mine[3].data_ptr()
    for name, g, r, f in zip(("out", "present_key", "present_value"), got, refs, fast):
        assert_close_op(g, r, dtype, f"plugin {name}")
        assert_close_op(g, f, dtype, f"plugin vs torch-fast {name}")


def test_aliased_step_time_follows_the_fill():
    """At a 64K-slot Jamba cache, an aliased step filled to 1K costs a fraction of one filled to 60K (the copied form
    costs the whole cache at any fill). Printed, asserted loosely (a guard against reading the whole cache)."""
    times = {}
    for fill in (1024, 61440):
        inputs = _inputs(1, 32, 8, 128, 65536, [fill - 1], torch.bfloat16)
        kernels = aot_attention.compile_launches([tuple(x.shape) for x in inputs], ["bfloat16"] * 5 + ["int64"],
                                                 {"scale": 0.0})
        _enqueue(inputs, True, kernels)  # load the modules
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            _enqueue(inputs, True, kernels)
        stop.record()
        stop.synchronize()
        times[fill] = start.elapsed_time(stop) / 20
    print(f"aliased plugin step (incl. Python enqueue): {times}")
    assert times[1024] < times[61440]


# --------------------------------------------------------------------------- the ORT CUDA library (same three kernels)
def _ort_cuda():
    ort = pytest.importorskip("onnxruntime")
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} has no CUDA provider (stage onnxruntime-gpu)")
    return ort


@pytest.mark.parametrize("alias", [True, False], ids=["aliased", "copied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: f"B{c[0]}-H{c[1]}-KV{c[2]}-hd{c[3]}-S{c[4]}")
def test_ort_cuda_op_launches_the_aot_kernels(case, dtype, alias):
    """One DecodeAttention node in an ORT CUDA session (no CPU fallback), the library's AOT table holding the three
    kernels: outputs against the `_ref`, present bound to the past buffers (in place) or to fresh ones (copied)."""
    import numpy as np

    from mambadeploy.plugins.ort import aot_table, build

    ort = _ort_cuda()
    _, H, KV, hd, _, _ = case
    name = str(dtype).removeprefix("torch.")
    library = build.build_library(cuda=True)
    aot_table.install(library, aot_table.compile_plan(aot_table.attention_specs(name, H // KV, hd)))
    aot_table.enable(library, True)
    aot_table.stats(library, reset=True)
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(library))
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    model = _model_for(case, name)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=[("CUDAExecutionProvider", {"use_tf32": "0"})])
    inputs = _inputs(*case, dtype)
    refs = decode_attention_update_ref(*inputs)
    mine = [x.clone() for x in inputs]
    outs = [torch.empty_like(mine[0])] + (mine[3:5] if alias else [torch.empty_like(x) for x in mine[3:5]])
    types = {torch.float32: np.float32, torch.bfloat16: 16, torch.int64: np.int64}
    io = sess.io_binding()
    for n, x in zip(("q", "k", "v", "key_cache", "value_cache", "pos"), mine):
        io.bind_input(n, "cuda", 0, types[x.dtype], list(x.shape), x.data_ptr())
    for n, x in zip(("out", "present_key", "present_value"), outs):
        io.bind_output(n, "cuda", 0, types[x.dtype], list(x.shape), x.data_ptr())
    sess.run_with_iobinding(io)
    torch.cuda.synchronize()
    stats = aot_table.stats(library, reset=True)
    print(stats)
    assert stats["launches"] >= 3 and stats["fallbacks"] == 0
    for n, g, r in zip(("out", "present_key", "present_value"), outs, refs):
        assert_close_op(g, r, dtype, f"ort-cuda {n}")


def _model_for(case, dtype):
    """test_decode_attention_op's one-node model at these shapes."""
    import test_decode_attention_op as cpu_tests

    cpu_tests.CASES["gpu"] = case
    return cpu_tests._model("gpu", dtype)
