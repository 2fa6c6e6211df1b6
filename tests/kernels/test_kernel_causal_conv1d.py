"""causal_conv1d / causal_conv1d_update (Triton) vs their references: dtypes x awkward shapes, both layouts,
with and without bias / initial state / SiLU."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DTYPES, full, make_gen, randn, small

from mambadeploy.kernels.causal_conv1d import (
    causal_conv1d,
    causal_conv1d_ref,
    causal_conv1d_update,
    causal_conv1d_update_ref,
)
from mambadeploy.validate.tolerances import op_checker

check_op = op_checker("causal_conv1d")  # fp32 on the CPU: this op's measured bound

# (batch, dim, L, K)
CASES = small((1, 40, 1, 4), (3, 40, 7, 4), (1, 72, 33, 4), (3, 24, 154, 3)) + full(
    (1, 2944, 2048, 4), (3, 2304, 154, 4), (2, 2944, 1, 4))


def _inputs(batch, dim, L, K, dtype, token_major=True, seed=0):
    g = make_gen(seed)
    x = randn(g, batch, L, dim, dtype=dtype)
    x = x.transpose(1, 2) if token_major else x.transpose(1, 2).contiguous()
    return x, randn(g, dim, K, dtype=dtype, scale=0.5), randn(g, dim, dtype=dtype), randn(g, batch, dim, K)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,dim,L,K", CASES)
def test_causal_conv1d_matches_ref(batch, dim, L, K, dtype):
    x, w, b, s0 = _inputs(batch, dim, L, K, dtype)
    y, final = causal_conv1d(x, w, b, s0, "silu")
    y_ref, final_ref = causal_conv1d_ref(x, w, b, s0, "silu")
    check_op(y, y_ref, dtype, what="y")
    assert torch.equal(final, final_ref)  # the final state is a copy of inputs: exact


@pytest.mark.parametrize("token_major", [True, False], ids=["token-major", "channel-major"])
@pytest.mark.parametrize("variant", ["plain", "bias", "init"])
def test_causal_conv1d_options(token_major, variant):
    x, w, b, s0 = _inputs(3, 40, 7, 4, torch.float32, token_major, seed=1)
    kwargs = {"bias": b if variant == "bias" else None, "initial_state": s0 if variant == "init" else None}
    y, final = causal_conv1d(x, w, **kwargs)
    y_ref, final_ref = causal_conv1d_ref(x, w, **kwargs)
    check_op(y, y_ref, torch.float32, what=f"y ({variant})")
    assert torch.equal(final, final_ref)
    assert y.stride(1) == (1 if token_major else 7)  # the output keeps the input's layout


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,dim,K", small((1, 40, 4), (3, 72, 4), (3, 24, 3)) + full((1, 2944, 4), (64, 2944, 4)))
def test_causal_conv1d_update_matches_ref_in_place(batch, dim, K, dtype):
    g = make_gen(2)
    x, w, b = randn(g, batch, dim, dtype=dtype), randn(g, dim, K, dtype=dtype, scale=0.5), randn(g, dim, dtype=dtype)
    state = randn(g, batch, dim, K)
    y_ref, state_ref = causal_conv1d_update_ref(x, state, w, b, "silu")
    y, out_state = causal_conv1d_update(x, state, w, b, "silu")
    assert out_state is state
    check_op(y, y_ref, dtype, what="y")
    assert torch.equal(state, state_ref)


def test_steps_continue_the_sequence():
    """conv over 12 steps == conv over the first 5, then 7 updates from its final state."""
    x, w, b, s0 = _inputs(2, 40, 12, 4, torch.float32, seed=3)
    y_all, final_all = causal_conv1d(x, w, b, s0, "silu")
    y5, state = causal_conv1d(x[..., :5], w, b, s0, "silu")
    ys = [causal_conv1d_update(x[..., t], state, w, b, "silu")[0] for t in range(5, 12)]
    check_op(torch.cat([y5, torch.stack(ys, -1)], -1), y_all, torch.float32, what="y")
    assert torch.equal(state, final_all)


def test_unknown_activation_is_refused():
    x, w, b, s0 = _inputs(1, 40, 7, 4, torch.float32)
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, w, b, s0, "relu")
