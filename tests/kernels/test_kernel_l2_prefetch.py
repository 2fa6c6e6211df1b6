"""The L2 prefetch sites of the batch-1 decode step (runtime/torch_fast.py L2_PREFETCH_SITES) only warm L2: each kernel
that carries one gives bitwise the same outputs with and without it. GPU only (the prefetch is Hopper PTX; on CPU and
below sm_90 the argument is dropped); that the sites compile to cp.async.bulk.prefetch.L2 is checked on CPU in
test_kernel_compile.py."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import make_gen, randn

from mambadeploy.kernels.gemv import gemv
from mambadeploy.kernels.moe_routing import add_rms_norm_route
from mambadeploy.kernels.rms_norm import add_rms_norm, rms_norm

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the L2 prefetch is Hopper PTX)")]
BF16 = torch.bfloat16


def _same(a, b):
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


def test_xproj_gemv_warming_out_proj_changes_nothing():
    g = make_gen(11)
    x, w = randn(g, 1, 2944, dtype=BF16), randn(g, 124, 2944, dtype=BF16)
    other = randn(g, 1472, 2944, dtype=BF16)
    _same([gemv(x, w, prefetch=(other, other.numel() * other.element_size()))], [gemv(x, w)])


def test_mixer_norm_warming_in_proj_changes_nothing():
    g = make_gen(12)
    x, w = randn(g, 1, 1472, dtype=BF16), randn(g, 1472, dtype=BF16)
    in_proj = randn(g, 5888, 1472, dtype=BF16)
    residual = randn(g, 1, 1472, dtype=torch.float32)
    _same(add_rms_norm(x, residual.clone(), w, 1e-5, prefetch=(in_proj, 8 << 20)),
          add_rms_norm(x, residual.clone(), w, 1e-5))
    _same([rms_norm(x, w, 1e-5, prefetch=(in_proj, 4 << 20))], [rms_norm(x, w, 1e-5)])


@pytest.mark.parametrize("nbytes", [1 << 20, 64 << 20], ids=["1MiB", "more-than-the-expert"])
def test_norm_route_warming_the_chosen_expert_changes_nothing(nbytes):
    g = make_gen(13)
    E, F, d = 8, 3872, 1472
    x, w = randn(g, 1, d, dtype=BF16), randn(g, d, dtype=BF16)
    router, bias = randn(g, E, d, dtype=BF16), randn(g, E, dtype=BF16)
    w1 = randn(g, E, 2 * F, d, dtype=BF16)
    residual = randn(g, 1, d, dtype=torch.float32)
    _same(add_rms_norm_route(x, residual.clone(), w, 1e-5, router, bias, "sigmoid_top1", 1, prefetch=(w1, nbytes)),
          add_rms_norm_route(x, residual.clone(), w, 1e-5, router, bias, "sigmoid_top1", 1))
