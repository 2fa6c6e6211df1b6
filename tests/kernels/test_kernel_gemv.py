"""gemv (Triton dense projection for decode batches) vs its fp32 reference: with and without bias, batch 1 (FMA path)
and 3 / 8 (tl.dot path), widths off block multiples, split-K (the interpreter's launch config splits K whenever it spans
more than one 32-wide chunk), strided rows of x."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DTYPES, full, make_gen, randn, small

from mambadeploy.kernels.gemv import MAX_ROWS, gemv, gemv_ref, launch_config
from mambadeploy.models.ref_ops import causal_conv1d_update_ref
from mambadeploy.validate.tolerances import op_checker

check_op = op_checker("gemv")  # fp32 on the CPU: this op's measured bound

# (M, N, K): tiny awkward widths on CPU; full: BlackMamba-2.8B in_proj, out_proj, x_proj, LM head; 1.5B x_proj
SHAPES = small((1, 40, 72), (3, 37, 150), (1, 5, 33), (8, 124, 300)) + full(
    (1, 5888, 1472), (1, 1472, 2944), (1, 124, 2944), (1, 50304, 1472), (3, 5888, 1472), (8, 1472, 2944),
    (8, 124, 2944), (3, 104, 2304))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_gemv_matches_ref(M, N, K, bias, dtype):
    g = make_gen()
    x = randn(g, M, K, dtype=dtype)
    w = randn(g, N, K, dtype=dtype, scale=K ** -0.5)
    b = randn(g, N, dtype=dtype) if bias else None
    y = gemv(x, w, b)
    assert y.shape == (M, N) and y.dtype == dtype
    check_op(y, gemv_ref(x, w, b), dtype, what=f"gemv {M}x{N}x{K}")


@pytest.mark.parametrize("split", [1, 2, 5])
def test_explicit_split_k_configs_agree(split):
    """The same product whatever the split (launch_config may pick any of them on a GPU); repeated launches reuse
    the arrival counters, which each launch leaves at zero."""
    g = make_gen(3)
    x, w, b = randn(g, 3, 300), randn(g, 21, 300, scale=300 ** -0.5), randn(g, 21)
    chunks = 10  # 300 / 32, rounded up
    per = -(-chunks // split)
    cfg = {"grid": (2, -(-chunks // per)), "num_warps": 4, "num_stages": 1, "k_per_split": per * 32,
           "constexprs": {"BLOCK_M": 4, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": -(-chunks // per), "USE_DOT": False}}
    for _ in range(2):
        check_op(gemv(x, w, b, config=cfg), gemv_ref(x, w, b), torch.float32, what=f"split {split}")


def test_strided_rows_of_x():
    g = make_gen(4)
    base = randn(g, 3, 100)
    x = base[:, 10:82]  # row stride 100, as a column slice of a wider activation
    w = randn(g, 33, 72, scale=72 ** -0.5)
    check_op(gemv(x, w), gemv_ref(x, w), torch.float32, what="strided x")


def test_gpu_launch_configs_fill_the_machine_and_split_short_wide_matrices():
    """The H100 configs (pure functions of shapes): enough programs for 132 SMs, split-K only for short-and-wide."""
    in_proj = launch_config(((1, 1472), (5888, 1472)))
    x_proj = launch_config(((1, 2944), (124, 2944)))
    assert in_proj["constexprs"]["SPLIT_K"] == 1 and in_proj["grid"][0] >= 264
    assert x_proj["constexprs"]["SPLIT_K"] > 1 and x_proj["grid"][0] * x_proj["grid"][1] >= 150
    for M in (1, 3, 8):
        cfg = launch_config(((M, 2944), (1472, 2944)))
        c = cfg["constexprs"]
        assert c["BLOCK_M"] >= M and cfg["k_per_split"] % c["BLOCK_K"] == 0 and c["USE_DOT"] == (M > 1)
        assert cfg["k_per_split"] * (cfg["grid"][1] - 1) < 2944  # no split starts past K


def test_bad_shapes_are_refused():
    g = make_gen()
    with pytest.raises(ValueError, match="do not fit"):
        gemv(randn(g, 2, 8), randn(g, 4, 9))
    with pytest.raises(ValueError, match="bias"):
        gemv(randn(g, 2, 8), randn(g, 4, 8), randn(g, 5))
    with pytest.raises(ValueError, match="at most"):
        launch_config(((MAX_ROWS + 1, 8), (4, 8)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,C,K,conv_bias,d_conv", [(1, 40, 24, True, 4), (3, 37, 40, False, 4), (8, 24, 33, True, 4),
                                                    (1, 40, 24, True, 3), (3, 37, 40, False, 2)] + full(
    (1, 2944, 1472, True, 4)))
def test_fused_conv_epilogue_matches_projection_then_conv_update(M, C, K, conv_bias, d_conv, dtype):
    """in_proj with Mamba's decode conv in its epilogue == gemv_ref, then causal_conv1d_update_ref on the first C
    outputs (channels off block multiples, batch 1 / 3 / 8, with and without the conv bias, conv widths 4 / 3 / 2);
    the state shifts."""
    g = make_gen(7)
    N = 2 * C
    x, w, b = randn(g, M, K, dtype=dtype), randn(g, N, K, dtype=dtype, scale=K ** -0.5), randn(g, N, dtype=dtype)
    state = randn(g, M, C, d_conv)
    cw, cb = randn(g, C, d_conv, dtype=dtype), randn(g, C, dtype=dtype) if conv_bias else None
    xz_ref = gemv_ref(x, w, b)
    xc_ref, state_ref = causal_conv1d_update_ref(xz_ref[:, :C], state.clone(), cw, cb, "silu")
    out = gemv(x, w, b, conv=(state, cw, cb))
    check_op(out[:, :C], xc_ref, dtype, what="conv output")
    check_op(out[:, C:], xz_ref[:, C:], dtype, what="z")
    assert torch.equal(state[..., :-1], state_ref[..., :-1])  # shifted by one, exactly
    # the newest column is the projection rounded to the model dtype: the dtype's tolerance (summation order)
    check_op(state[..., -1], state_ref[..., -1], dtype, what="conv state, newest input")


def test_fused_conv_refuses_a_mismatched_state():
    x, w = torch.randn(2, 16), torch.randn(40, 16)
    with pytest.raises(ValueError, match="conv state"):
        gemv(x, w, conv=(torch.zeros(2, 20, 4, dtype=torch.float16), torch.randn(20, 4), None))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the L2 prefetch is Hopper PTX)")
def test_l2_prefetch_of_another_weight_changes_nothing():
    """prefetch=(weight, nbytes) only warms L2 (x_proj warming out_proj's weight, the runner's site): same result."""
    g = make_gen(11)
    x, w = randn(g, 1, 2944, dtype=torch.bfloat16), randn(g, 124, 2944, dtype=torch.bfloat16)
    other = randn(g, 1472, 2944, dtype=torch.bfloat16)
    plain = gemv(x, w)
    warmed = gemv(x, w, prefetch=(other, other.numel() * other.element_size()))
    torch.testing.assert_close(warmed, plain, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,K", small((1, 40, 72), (3, 37, 150)) + full((1, 50304, 1472)))
def test_fp32_out_holds_the_model_dtype_result_widened(M, N, K, dtype):
    """out fp32 (the LM head's logits buffer): exactly gemv(...).float(), split-K or not."""
    g = make_gen(31)
    x, w = randn(g, M, K, dtype=dtype), randn(g, N, K, dtype=dtype, scale=0.05)
    out = torch.full((M, N), float("nan"), device=x.device)
    gemv(x, w, out=out)
    torch.testing.assert_close(out, gemv(x, w).float(), rtol=0, atol=0)


def test_bad_out_is_refused():
    x, w = torch.randn(2, 16), torch.randn(40, 16)
    with pytest.raises(ValueError, match="out"):
        gemv(x, w, out=torch.empty(2, 41))
    with pytest.raises(ValueError, match="out"):
        gemv(x.half(), w.half(), out=torch.empty(2, 40, dtype=torch.bfloat16))
