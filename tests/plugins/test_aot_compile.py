"""The AOT compile without a GPU: triton.compile of each plugin adapter (every registry op) for sm_90, PTX entry with exactly
the TensorRT parameter order (inputs, int32 scalars, outputs — Triton's unused scratch pointers stripped), and the
stripped PTX still assembles (Triton's bundled ptxas-blackwell, which reads the PTX ISA Triton 3.9 writes). Runs in
CI; the GPU launch of the same PTX is tests/plugins/test_aot_gpu.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from components import DEV_INSTALL, require_module

from mambadeploy.opset import get_op
from mambadeploy.plugins import aot

triton = require_module("triton", DEV_INSTALL)

# (shapes in op order, dtypes given the activation dtype T, attributes, expected scalars, expected grid[0])
CASES = {
    "SelectiveScan": ([(2, 6, 33), (2, 6, 33), (6, 4), (2, 4, 33), (2, 4, 33), (6,), (2, 6, 33), (6,), (2, 6, 4)],
                      lambda t: [t, t, "float32", t, t, t, t, t, "float32"], {"delta_softplus": 1}, (6, 33, 4), 2),
    "CausalConv1d": ([(2, 33, 7), (33, 4), (33,), (2, 33, 4)], lambda t: [t, t, t, "float32"], {"activation": 1},
                     (33, 7), 2),
    "TopKExpertGather": ([(5, 24), (3, 20, 24), (3, 24, 10), (5, 2), (5, 2)],
                         lambda t: [t, t, t, "int64", "float32"], {"activation": 0, "top_k": 2}, (24, 10), 5),
    "CausalConv1dUpdate": ([(3, 33), (3, 33, 4), (33, 4), (33,)], lambda t: [t, "float32", t, t], {"activation": 1},
                           (33,), 3),
    "SelectiveStateUpdate": ([(3, 40, 16), (3, 40), (3, 40), (40, 16), (3, 16), (3, 16), (40,), (3, 40), (40,)],
                             lambda t: ["float32", t, t, "float32", t, t, t, t, t], {"dt_softplus": 1}, (40, 16), 3),
    "AddRMSNorm": ([(3, 72), (3, 72), (72,)], lambda t: [t, "float32", t], {"epsilon": 1e-6}, (72,), 3),
    "RoutedMoE": ([(5, 24), (4, 24), (4,), (4, 20, 24), (4, 24, 10)], lambda t: [t, t, t, t, t],
                  {"router": 1, "top_k": 2, "activation": 1}, (24, 10, 4), 5),
    "SparseLinear": ([(3, 150), (70, 150), (70,)], lambda t: [t, t, t], {"mode": 0.1, "threshold": 0.6}, (150, 70), 3),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("op", list(CASES))
def test_compiles_for_sm90_in_trt_order(op, dtype, tmp_path):
    shapes, dtypes, attrs, scalars, grid_x = CASES[op]
    k = _compile(op, shapes, dtypes(dtype), attrs)
    entry, spec = get_op(op), aot.SPECS[op]
    assert k.params == tuple([f"input:{n}" for n in entry.inputs] + [f"scalar:{n}" for n in spec.scalars]
                             + [f"output:{n}" for n in entry.outputs])
    assert len(aot.ptx_params(k.ptx, k.kernel_name)) == len(k.params)
    assert k.scalars == scalars and k.grid[0] == grid_x and k.block[0] == 32 * k.num_warps
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell"
    if ptxas.exists():
        (tmp_path / "k.ptx").write_text(k.ptx)
        r = subprocess.run([str(ptxas), "-arch=sm_90a", str(tmp_path / "k.ptx"), "-o", str(tmp_path / "k.cubin")],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


def test_attributes_become_constexprs():
    shapes, dtypes, _, _, _ = CASES["SelectiveScan"]
    assert aot.launch_choice("SelectiveScan", shapes, dtypes("float32"), {"delta_softplus": 0})["constexprs"][
        "DELTA_SOFTPLUS"] is False
    shapes, dtypes, _, _, _ = CASES["CausalConv1d"]
    choice = aot.launch_choice("CausalConv1d", shapes, dtypes("float32"), {"activation": 0})
    assert choice["constexprs"]["SILU"] is False
    shapes, dtypes, _, _, _ = CASES["TopKExpertGather"]
    c = aot.launch_choice("TopKExpertGather", shapes, dtypes("float32"), {"activation": 2, "top_k": 2})["constexprs"]
    assert c["ACTIVATION"] == 2 and c["TOP_K"] == 2


def test_top_k_attribute_must_match_the_experts_columns():
    from mambadeploy.errors import MambaDeployError

    shapes, dtypes, _, _, _ = CASES["TopKExpertGather"]
    with pytest.raises(MambaDeployError, match="top_k=1 but experts has 2 columns"):
        aot.launch_choice("TopKExpertGather", shapes, dtypes("float32"), {"activation": 0, "top_k": 1})


def _compile(op, shapes, dtypes, attrs):
    return aot.compile_for(op, shapes, dtypes, attrs, arch=90)


def test_stripping_keeps_referenced_parameters():
    ptx = (".visible .entry k(\n .param .u64 k_param_0,\n .param .u32 k_param_1,\n .param .u64 k_param_2\n)\n"
           "{ ld.param.u64 %rd1, [k_param_0]; ld.param.u64 %rd2, [k_param_2]; }")
    assert len(aot.ptx_params(aot.strip_unused_trailing_params(ptx, "k", keep=1), "k")) == 3  # param_2 is read
    unread = ptx.replace("[k_param_2]", "[k_param_0]")
    assert len(aot.ptx_params(aot.strip_unused_trailing_params(unread, "k", keep=1), "k")) == 1


def test_every_registry_op_has_an_aot_kernel(monkeypatch):
    from mambadeploy.errors import MambaDeployError
    from mambadeploy.opset import REGISTRY

    # a new op without an adapter fails here; the decode step's ops are the known gap (their TensorRT plugins parse and
    # build into plans, but have no enqueue kernel yet: ORT runs them with CUDA kernels of their own)
    assert set(REGISTRY) - set(aot.SPECS) - set(aot.MULTI_LAUNCH) == set(aot.NO_AOT_KERNEL_YET)
    assert set(aot.SPECS) | set(aot.MULTI_LAUNCH) <= set(REGISTRY)  # DecodeAttention: test_decode_attention_op.py
    monkeypatch.delitem(aot.SPECS, "CausalConv1d")
    with pytest.raises(MambaDeployError, match="no ahead-of-time kernel yet"):
        aot.spec_for("CausalConv1d")


def _vector_loads(ptx: str) -> int:
    import re

    return len(re.findall(r"ld\.global[^\n]*\.v[24]", ptx)) + len(re.findall(r"cp\.async", ptx))


def test_aot_kernels_are_compiled_for_aligned_pointers():
    """Without the 16-byte alignment hint Triton's JIT gives aligned tensors, an AOT compile loads 2 B a thread (the
    DecodeAttention plugin ran 1.9x torch-fast's time on the H200): the split kernel's PTX must carry vector or async
    loads. (Kernels whose row strides are runtime scalars, e.g. AddRMSNorm's d, stay scalar: the JIT's divisibility
    hints on integer arguments are not given ahead of time.)"""
    from mambadeploy.plugins import aot_attention

    shapes = [(1, 32, 128), (1, 8, 128), (1, 8, 128), (1, 8, 4096, 128), (1, 8, 4096, 128), (1,)]
    kernels = aot_attention.compile_launches(shapes, ["bfloat16"] * 5 + ["int64"], {}, arch=90)
    split = next(k for k in kernels if "split" in k.kernel_name)
    loads = _vector_loads(split.ptx)
    print("vector / async global loads in the split kernel's PTX:", loads)
    assert loads > 0


def test_a_misaligned_pointer_is_refused():
    with pytest.raises(Exception, match="not 16-byte aligned"):
        aot.check_aligned("k", [0x1000, 0x1002])
    aot.check_aligned("k", [0, 0x1000, 0x2040])


def test_shape_scalars_get_the_jit_divisibility_hint_only_when_fixed():
    """compile_for at exact shapes (IPluginV3 recompiles on a shape change) marks scalars that are multiples of 16 as
    the JIT does: AddRMSNorm's row stride d = 1024 then loads vectors. A kernel compiled at other choice shapes (one
    binary for a profile) must not assume it."""
    dtypes = CASES["AddRMSNorm"][1]("bfloat16")
    exact = _compile("AddRMSNorm", [(3, 1024), (3, 1024), (1024,)], dtypes, {"epsilon": 1e-6})
    shared = aot.compile_for("AddRMSNorm", [(3, 1024), (3, 1024), (1024,)], dtypes, {"epsilon": 1e-6}, arch=90,
                             choice_shapes=[(8, 1024), (8, 1024), (1024,)])
    print("vector loads: exact shapes", _vector_loads(exact.ptx), "profile binary", _vector_loads(shared.ptx))
    assert _vector_loads(exact.ptx) > 0 and _vector_loads(shared.ptx) == 0
