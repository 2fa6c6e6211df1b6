"""selective_state_update (Triton, in place) vs selective_state_update_ref; also many steps in a row."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DTYPES, full, make_gen, rand, randn, small

from mambadeploy.kernels.selective_scan import selective_scan_ref
from mambadeploy.kernels.selective_state_update import selective_state_update, selective_state_update_ref
from mambadeploy.validate.tolerances import op_checker

check_op = op_checker("state_update")  # fp32 on the CPU: this op's measured bound

CASES = small((1, 40, 16), (3, 40, 16), (3, 33, 8)) + full((1, 2944, 16), (64, 2944, 16), (3, 2304, 16), (8, 2304, 16))


def _inputs(batch, dim, N, dtype, seed=0):
    g = make_gen(seed)
    x, z = randn(g, batch, dim, dtype=dtype), randn(g, batch, dim, dtype=dtype)
    dt = randn(g, batch, dim, dtype=dtype, scale=0.5)
    A = -rand(g, dim, N, lo=0.5, hi=N)
    B, C = randn(g, batch, N, dtype=dtype), randn(g, batch, N, dtype=dtype)
    D, bias = randn(g, dim), randn(g, dim, scale=0.5) - 2.0
    state = randn(g, batch, dim, N)
    return state, x, dt, A, B, C, D, z, bias


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,dim,N", CASES)
def test_state_update_matches_ref_in_place(batch, dim, N, dtype):
    state, x, dt, A, B, C, D, z, bias = _inputs(batch, dim, N, dtype)
    y_ref, state_ref = selective_state_update_ref(state, x, dt, A, B, C, D, z, bias, True)
    y, out_state = selective_state_update(state, x, dt, A, B, C, D, z, bias, True)
    assert out_state is state  # updated in place
    check_op(y, y_ref, dtype, what="y")
    check_op(state, state_ref, torch.float32, what="state")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,dim,N,R", small((1, 40, 16, 5), (3, 72, 16, 7)) + full(
    (1, 2944, 16, 92), (64, 2304, 16, 72)))
def test_state_update_with_fused_dt_projection(batch, dim, N, R, dtype):
    """dt arrives low-rank (batch, R) and the kernel applies dt_proj (dim, R) itself."""
    state, x, _, A, B, C, D, z, bias = _inputs(batch, dim, N, dtype, seed=4)
    g = make_gen(5)
    dt_low, w = randn(g, batch, R, dtype=dtype), randn(g, dim, R, dtype=dtype, scale=R ** -0.5)
    dt = torch.nn.functional.linear(dt_low.float(), w.float())  # the reference gets the full-rank dt in fp32
    y_ref, state_ref = selective_state_update_ref(state, x, dt, A, B, C, D, z, bias, True)
    y, _ = selective_state_update(state, x, dt_low, A, B, C, D, z, bias, True, dt_proj_weight=w)
    check_op(y, y_ref, dtype, what="y")
    check_op(state, state_ref, torch.float32, what="state")


def test_state_update_without_optional_inputs():
    state, x, dt, A, B, C, *_ = _inputs(3, 40, 16, torch.float32, seed=1)
    dt = dt.abs() * 0.2
    y_ref, state_ref = selective_state_update_ref(state, x, dt, A, B, C, dt_softplus=False)
    y, _ = selective_state_update(state, x, dt, A, B, C, dt_softplus=False)
    check_op(y, y_ref, torch.float32, what="y")
    check_op(state, state_ref, torch.float32, what="state")


def test_steps_reproduce_the_sequence_scan():
    """40 decode steps from a start state == one scan over those 40 steps (the stateful-consistency check)."""
    batch, dim, N, L = 2, 24, 16, 40
    g = make_gen(2)
    u, z, delta = randn(g, batch, dim, L), randn(g, batch, dim, L), randn(g, batch, dim, L, scale=0.5)
    A, D, bias = -rand(g, dim, N, lo=0.5, hi=N), randn(g, dim), randn(g, dim, scale=0.5) - 2.0
    B, C, h0 = randn(g, batch, N, L), randn(g, batch, N, L), randn(g, batch, dim, N)
    y_seq, h_seq = selective_scan_ref(u, delta, A, B, C, D, z, bias, True, h0)
    state = h0.clone()
    ys = [selective_state_update(state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D, z[..., t], bias)[0]
          for t in range(L)]
    check_op(torch.stack(ys, -1), y_seq, torch.float32, what="y over 40 steps")
    check_op(state, h_seq, torch.float32, what="state after 40 steps")


def test_state_must_be_fp32():
    state, x, dt, A, B, C, *_ = _inputs(1, 40, 16, torch.float32)
    with pytest.raises(ValueError, match="fp32"):
        selective_state_update(state.half(), x, dt, A, B, C)
