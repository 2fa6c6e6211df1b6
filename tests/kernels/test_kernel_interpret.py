"""The interpreted twin: CPU tensors run through Triton's interpreter without turning the module-level kernels into
interpreter objects (the ahead-of-time plugin compile needs them as JITFunctions) and without leaving
TRITON_INTERPRET behind."""

from __future__ import annotations

import os

import pytest
import torch

from mambadeploy.kernels import rms_norm as norm_module
from mambadeploy.kernels.interpret import is_interpreted, kernel_for


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the whole process runs interpreted")
def test_cpu_runs_leave_the_module_kernels_compilable():
    before = os.environ.get("TRITON_INTERPRET")
    x = torch.randn(3, 16)
    norm_module.rms_norm(x, torch.ones(16), 1e-5)
    assert not is_interpreted(norm_module.add_rms_norm_kernel)
    assert is_interpreted(kernel_for(norm_module.add_rms_norm_kernel, x))
    assert os.environ.get("TRITON_INTERPRET") == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_gpu_tensors_use_the_compiled_kernel():
    x = torch.randn(3, 16, device="cuda")
    assert kernel_for(norm_module.add_rms_norm_kernel, x) is norm_module.add_rms_norm_kernel
