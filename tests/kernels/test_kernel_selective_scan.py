"""selective_scan (Triton) vs selective_scan_ref: dtypes x awkward lengths/widths, both layouts, optional inputs."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DTYPES, full, make_gen, rand, randn, small

from mambadeploy.kernels.selective_scan import chunked_launch_config, launch_config, selective_scan, selective_scan_ref
from mambadeploy.validate.tolerances import op_checker

check_op = op_checker("selective_scan")  # fp32 on the CPU: this op's measured bound

# (batch, dim, L, N): widths off every block multiple, lengths 1 / 7 / 33 / 154, batch 1 and 3
CASES = small((1, 40, 1, 16), (3, 40, 7, 16), (3, 24, 33, 8), (1, 24, 154, 16)) + full(
    (1, 2944, 2048, 16), (3, 2304, 154, 16), (1, 2944, 1, 16), (2, 2944, 33, 16))


def _inputs(batch, dim, L, N, dtype, token_major=True, seed=0):
    g = make_gen(seed)

    def seq(scale=1.0):  # (batch, dim, L) in the requested layout
        t = randn(g, batch, L, dim, dtype=dtype, scale=scale)
        return t.transpose(1, 2) if token_major else t.transpose(1, 2).contiguous()

    u, z = seq(), seq()
    delta = seq(0.5)
    A = -rand(g, dim, N, lo=0.5, hi=N)
    B = randn(g, batch, L, N, dtype=dtype).transpose(1, 2)  # (batch, N, L) as x_proj makes it
    C = randn(g, batch, L, N, dtype=dtype).transpose(1, 2)
    D = randn(g, dim)
    bias = randn(g, dim, scale=0.5) - 2.0
    h0 = randn(g, batch, dim, N)
    return u, delta, A, B, C, D, z, bias, h0


def _check(out, ref, dtype):
    check_op(out[0], ref[0], dtype, what="y")
    check_op(out[1], ref[1], torch.float32, what="last_state")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,dim,L,N", CASES)
def test_selective_scan_matches_ref(batch, dim, L, N, dtype):
    u, delta, A, B, C, D, z, bias, h0 = _inputs(batch, dim, L, N, dtype)
    out = selective_scan(u, delta, A, B, C, D, z, bias, True, h0)
    _check(out, selective_scan_ref(u, delta, A, B, C, D, z, bias, True, h0), dtype)
    assert out[0].shape == u.shape and out[0].dtype == dtype and out[1].dtype == torch.float32


@pytest.mark.parametrize("token_major", [True, False], ids=["token-major", "channel-major"])
def test_selective_scan_without_optional_inputs(token_major):
    u, delta, A, B, C, *_ = _inputs(3, 40, 33, 16, torch.float32, token_major, seed=1)
    delta = delta.abs() * 0.2  # without softplus the step must already be positive
    out = selective_scan(u, delta, A, B, C)  # no D, z, bias, softplus or initial state
    _check(out, selective_scan_ref(u, delta, A, B, C), torch.float32)


@pytest.mark.parametrize("block_d", [1, 4])
def test_selective_scan_chunked_path_on_small_tiles(block_d):
    """The GPU configuration (associative scan over CHUNK steps, carried state, masked tail) at tiles small enough for
    the interpreter: 3 chunks of 8 with a partial last one; with 4 channels a block, 2 blocks with a masked tail."""
    u, delta, A, B, C, D, z, bias, h0 = _inputs(2, 7, 20, 4, torch.float32, seed=2)
    config = {"kernel": "selective_scan_kernel", "grid": (2, -(-7 // block_d)), "num_warps": 4, "num_stages": 1,
              "constexprs": {"BLOCK_D": block_d, "BLOCK_N": 4, "CHUNK": 8}}
    out = selective_scan(u, delta, A, B, C, D, z, bias, True, h0, config=config)
    _check(out, selective_scan_ref(u, delta, A, B, C, D, z, bias, True, h0), torch.float32)


@pytest.mark.parametrize("token_major", [True, False], ids=["token-major", "channel-major"])
@pytest.mark.parametrize("seg_len,block_d", [(5, 8), (8, 4), (20, 8), (1, 8)])
def test_selective_scan_segmented_path(seg_len, block_d, token_major):
    """The GPU configuration of the segment-parallel kernel at interpreter sizes: a state pass over all segments but
    the last, then the output pass folding them onto the initial state; segments that do not divide L (20 = 4 x 5,
    2 x 8 + 4), one segment (20), one step a segment (1), channel blocks with a masked tail (7 channels)."""
    u, delta, A, B, C, D, z, bias, h0 = _inputs(2, 7, 20, 4, torch.float32, token_major, seed=4)
    n_seg = -(-20 // seg_len)
    config = {"kernel": "selective_scan_seg_kernel", "grid": (2, -(-7 // block_d), n_seg), "num_warps": 1,
              "num_stages": 1, "constexprs": {"BLOCK_D": block_d, "BLOCK_N": 4},
              "scalars": {"seg_len": seg_len, "n_seg": n_seg}}
    out = selective_scan(u, delta, A, B, C, D, z, bias, True, h0, config=config)
    _check(out, selective_scan_ref(u, delta, A, B, C, D, z, bias, True, h0), torch.float32)
    out = selective_scan(u, delta, A, B, C, config=config)  # without the optional inputs
    _check(out, selective_scan_ref(u, delta, A, B, C), torch.float32)


def test_pad_steps_leave_the_state_untouched():
    """delta = -inf with softplus gives a zero step (how the runners skip left padding)."""
    u, delta, A, B, C, D, z, bias, h0 = _inputs(1, 40, 7, 16, torch.float32, seed=3)
    delta = torch.full_like(delta, float("-inf"))
    _, h = selective_scan(u, delta, A, B, C, D, z, bias, True, h0)
    assert torch.equal(h, h0)


@pytest.mark.parametrize("L", [1, 2048, 16384])
def test_launch_config_is_plain_data(L):
    shapes = ((1, 2944, L), (1, 2944, L), (2944, 16))
    cfg = launch_config(shapes)
    assert cfg["grid"][0] == 1 and cfg["grid"][1] * cfg["constexprs"]["BLOCK_D"] >= 2944
    assert set(cfg) == {"kernel", "grid", "num_warps", "num_stages", "constexprs", "scalars"}
    seg = cfg["scalars"]
    assert cfg["grid"][2] == seg["n_seg"] and (seg["n_seg"] - 1) * seg["seg_len"] < L <= seg["n_seg"] * seg["seg_len"]
    assert cfg == launch_config(shapes)
    chunked = chunked_launch_config(shapes)
    assert chunked["kernel"] == "selective_scan_kernel" and set(chunked) == set(cfg) - {"scalars"}
