"""decode_attention (Triton split-K, GQA in the kernel, reads only the filled slots) vs decode_attention_ref."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DEVICE, DTYPES, full, make_gen, randn, small

from mambadeploy.kernels.decode_attention import decode_attention, decode_attention_ref, launch_config
from mambadeploy.validate.tolerances import op_checker

check_op = op_checker("decode_attention")  # fp32 on the CPU: this op's measured bound

# (batch, heads, kv_heads, slots, head_dim, lengths): odd fills, a fill of 1, a full cache, kv_heads < heads, MHA
CASES = small(
    (1, 4, 2, 37, 12, (37,)),
    (3, 4, 2, 50, 12, (1, 33, 50)),
    (3, 6, 1, 29, 8, (17, 2, 29)),
    (1, 3, 3, 70, 16, (69,)),
    (3, 8, 2, 150, 12, (150, 64, 65)),
) + full((1, 32, 8, 262144, 128, (131071,)), (4, 32, 8, 32768, 128, (2048, 1, 32768, 7777)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,heads,kv,slots,hd,lengths", CASES)
def test_decode_attention_matches_ref(batch, heads, kv, slots, hd, lengths, dtype):
    g = make_gen(7)
    q = randn(g, batch, heads, hd, dtype=dtype)
    k, v = randn(g, batch, kv, slots, hd, dtype=dtype), randn(g, batch, kv, slots, hd, dtype=dtype)
    lens = torch.tensor(lengths, device=DEVICE)
    out = decode_attention(q, k, v, lens)
    assert out.dtype == dtype and out.shape == q.shape
    check_op(out, decode_attention_ref(q, k, v, lens), dtype)


def test_many_splits_some_empty():
    """Eight splits of 16-slot blocks over fills of 1, 40 and 129: most of the short rows' splits are empty."""
    g = make_gen(11)
    q = randn(g, 3, 4, 12)
    k, v = randn(g, 3, 2, 130, 12), randn(g, 3, 2, 130, 12)
    lens = torch.tensor([1, 40, 129], device=DEVICE)
    cfg = launch_config((q.shape, k.shape), interpret=True)
    cfg = dict(cfg, grid=(3, 2, 8), splits=8, constexprs=dict(cfg["constexprs"], BLOCK_N=16))
    check_op(decode_attention(q, k, v, lens, config=cfg), decode_attention_ref(q, k, v, lens), torch.float32)


def test_slots_past_the_fill_are_never_read():
    """NaN in every slot past each row's length changes nothing: the kernel does not read them."""
    g = make_gen(3)
    q = randn(g, 3, 4, 12)
    k, v = randn(g, 3, 2, 40, 12), randn(g, 3, 2, 40, 12)
    lens = torch.tensor([5, 40, 19], device=DEVICE)
    expected = decode_attention_ref(q, k, v, lens)
    for row, n in enumerate(lens.tolist()):
        k[row, :, n:] = float("nan")
        v[row, :, n:] = float("nan")
    out = decode_attention(q, k, v, lens)
    assert torch.isfinite(out).all()
    check_op(out, expected, torch.float32)


def test_fp8_cache():
    """An e4m3 cache is widened inside the kernel: same result as the reference on the same fp8 values."""
    g = make_gen(5)
    q = randn(g, 3, 4, 12)
    k = randn(g, 3, 2, 21, 12).to(torch.float8_e4m3fn)
    v = randn(g, 3, 2, 21, 12).to(torch.float8_e4m3fn)
    lens = torch.tensor([21, 3, 10], device=DEVICE)
    check_op(decode_attention(q, k, v, lens), decode_attention_ref(q, k, v, lens), torch.float32)


def test_launch_does_not_depend_on_the_fill():
    """The grid comes from shapes only (so a CUDA graph holds for any fill); splits never exceed the slots' blocks."""
    a = launch_config(((1, 32, 128), (1, 8, 262144, 128)))
    assert a["grid"] == (1, 8, a["splits"]) and a["combine_grid"] == (1, 32) and a["splits"] > 1
    assert a["constexprs"]["BLOCK_G"] == 16  # the group of 4 padded to a tensor-core tile
    assert launch_config(((1, 4, 12), (1, 2, 20, 12)))["splits"] == 1  # 20 slots: one block of 64
    assert launch_config(((1, 4, 12), (1, 2, 500, 12)), interpret=True)["splits"] == 2


def test_bad_shapes_are_refused():
    q = torch.zeros(2, 4, 12)
    with pytest.raises(ValueError, match="do not fit"):
        decode_attention(q, torch.zeros(2, 3, 8, 12), torch.zeros(2, 3, 8, 12), torch.ones(2, dtype=torch.int64))
