"""(c) One kernel source for torch-fast and ORT, the CPU-checkable half: which Triton kernels an export's custom nodes
need (aot_table.plan_for), that they compile ahead of time for sm_90 with the parameter count the C++ launcher passes,
and the CUDA library's kernel table (aot_launch.cc) through its C entry points: the key it builds equals
aot_table.kernel_key, registration, the on/off switch and the counters. Launching the kernels needs a GPU:
tests/plugins/test_ort_cuda_ops.py (path "aot") and tests/runtime/test_ort_runner.py run them on the device."""

from __future__ import annotations

import ctypes
import itertools
import os
import shutil

import pytest
from components import DEV_INSTALL, require, require_module

from mambadeploy.errors import MambaDeployError
from mambadeploy.plugins.ort import aot_table


@pytest.fixture(scope="module")
def cuda_library():
    from mambadeploy.plugins.ort import build

    if not (shutil.which("nvcc") or os.environ.get("NVCC")):
        pytest.skip("no nvcc on this machine: the CUDA build of the ORT library cannot be compiled here")
    try:
        return build.build_library(cuda=True)
    except MambaDeployError as exc:
        if "fetching ORT headers" in str(exc):
            require(False, "ORT headers for the CUDA build", str(exc))
        raise


@pytest.mark.parametrize("preset,top_k,scan_flags", [
    ("blackmamba-tiny", 1, {"D": 1, "bias": 1, "h0": 0, "softplus": 1, "z": 1}),
    ("jamba-tiny", 2, {"D": 1, "bias": 1, "h0": 0, "softplus": 1, "z": 1}),
])
def test_plan_covers_every_custom_node(preset, top_k, scan_flags):
    from mambadeploy.runtime.ort_runner import export_for

    specs = aot_table.plan_for(export_for(preset, "bf16", ops="custom"))
    keys = {}
    for s in specs:
        keys.setdefault(s.key, []).append((s.lo, s.hi))
    roles = {k.split("|")[0] for k in keys}
    expected = {"scan.state", "scan.out", "scan.fold", "conv", "moe.fc1", "moe.fc2", "moe.align.i64",
                "moe.align.i32"}
    attention = {"attn.write", "attn.split", "attn.combine"} if preset == "jamba-tiny" else set()
    assert expected | ({"moe.sum"} if top_k > 1 else set()) | attention == roles
    fc1 = next(k for k in keys if k.startswith("moe.fc1"))
    assert f"k={top_k}" in fc1 and "|bf16|" in fc1
    scan = next(k for k in keys if k.startswith("scan.out"))
    assert scan.endswith(",".join(f"{n}={v}" for n, v in sorted(scan_flags.items())).split(",", 1)[1])
    for key, ranges in keys.items():  # every key's variants tile [first size, 2^62] without a gap or an overlap
        ranges.sort()
        assert all(a[1] + 1 == b[0] for a, b in zip(ranges, ranges[1:])), (key, ranges)
        assert ranges[-1][1] == aot_table.MAX_SIZE, (key, ranges)
    moe = [s for s in specs if s.key.startswith("moe.fc1")]
    assert [s.meta["BLOCK_M"] for s in sorted(moe, key=lambda s: s.lo)] == [16, 128]  # decode, then prefill tiles


def test_kernels_compile_for_hopper_with_the_launchers_parameter_count():
    require_module("triton", DEV_INSTALL)
    specs = aot_table.moe_specs("float16", 48, 64, 4, 2, 1, experts_int64=False)
    specs = [s for s in specs if s.key.startswith(("moe.sum", "moe.align"))][:2]
    specs += [s for s in aot_table.scan_specs("float32", 8, D=True, z=False, bias=True, h0=True, softplus=True)
              if s.key.startswith("scan.fold")][:1]
    compiled = aot_table.compile_plan(specs, arch=90)
    declared = {"moe_sum_ort": 3, "moe_align_ort": 5, "scan_fold_ort": 6}  # what ops_cuda_aot.cc passes
    for k in compiled:
        print(k.spec.key, k.name, len(k.cubin), "bytes, params", k.n_params)
        assert k.cubin[:4] == b"\x7fELF"
        assert declared[k.spec.adapter] <= k.n_params <= declared[k.spec.adapter] + 2  # + Triton's scratch pointers


def test_decode_attention_kernels_compile_with_the_launchers_parameter_count():
    """DecodeAttention's three launches (ops_cuda_aot.cc AotDecodeAttention passes 8, 10 and 4 parameters); the combine
    has a variant per range of splits, tiling [1, 2^62]."""
    require_module("triton", DEV_INSTALL)
    specs = aot_table.attention_specs("bfloat16", 4, 128)
    combine = sorted((s.lo, s.hi) for s in specs if s.key.startswith("attn.combine"))
    assert combine[0][0] == 1 and combine[-1][1] == aot_table.MAX_SIZE
    assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(combine))
    compiled = aot_table.compile_plan([s for s in specs if not s.key.startswith("attn.combine")] + specs[-1:], arch=90)
    declared = {"decode_attention_write_trt": 8, "decode_attention_split_trt": 10, "decode_attention_combine_trt": 4}
    for k in compiled:
        assert k.cubin[:4] == b"\x7fELF"
        assert declared[k.spec.adapter] <= k.n_params <= declared[k.spec.adapter] + 2, (k.spec.adapter, k.n_params)


def _c_key(lib, role, dtype, dims):
    names = (ctypes.c_char_p * len(dims))(*[n.encode() for n in dims])
    values = (ctypes.c_int64 * len(dims))(*dims.values())
    buf = ctypes.create_string_buffer(512)
    assert lib.mambadeploy_aot_key(role.encode(), dtype.encode(), len(dims), names, values, buf, 512) > 0
    return buf.value.decode()


def test_library_builds_the_same_keys_and_keeps_a_table(cuda_library):
    lib = aot_table._library(cuda_library)
    for role, dtype, dims in [("moe.fc1", "bf16", {"d": 64, "F": 96, "E": 4, "k": 1, "act": 0}),
                              ("scan.out", "fp16", {"z": 1, "N": 16, "h0": 0, "D": 0, "bias": 1, "softplus": 1}),
                              ("attn.split", "bf16", {"hd": 128, "G": 4})]:
        assert _c_key(lib, role, dtype, dims) == aot_table.kernel_key(role, dtype, **dims)
    before = aot_table.stats(cuda_library, reset=True)
    spec = aot_table.KernelSpec(aot_table.kernel_key("test.only", "-", n=1), 1, 5, "moe_sum_ort", {}, {}, 1, 1,
                                meta={"BLOCK": 64})
    fake = aot_table.CompiledKernel(spec, "not_a_kernel", b"\x7fELF-not-loaded-without-a-GPU", 0, 5)
    assert aot_table.install(cuda_library, [fake, fake]) == 2  # the same range twice: replaced, not added
    after = aot_table.stats(cuda_library)
    assert after["variants"] == before["variants"] + 1
    assert after["launches"] == 0 and after["fallbacks"] == 0
    aot_table.enable(cuda_library, False)
    aot_table.enable(cuda_library, True)
