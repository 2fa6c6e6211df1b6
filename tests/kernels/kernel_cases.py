"""Shared helpers of the kernel parity tests: small shapes run on whatever device there is (CPU: Triton's
interpreter, through the kernels' interpreted twin — no environment variable needed), full model shapes on a GPU only
(marked gpu)."""

from __future__ import annotations

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (full shapes)")


def full(*cases):
    """Cases at full model shapes: marked gpu and skipped without CUDA."""
    return [pytest.param(*c, marks=(pytest.mark.gpu, needs_gpu), id="full-" + "-".join(map(str, c))) for c in cases]


def small(*cases):
    return [pytest.param(*c, id="-".join(map(str, c))) for c in cases]


def make_gen(seed: int = 1234):
    """A seeded generator on the test device; every test draws its random inputs from it (never zeros)."""
    return torch.Generator(device=DEVICE).manual_seed(seed)


def randn(gen, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen, device=DEVICE) * scale).to(dtype)


def rand(gen, *shape, lo=0.0, hi=1.0):
    return torch.rand(*shape, generator=gen, device=DEVICE) * (hi - lo) + lo
