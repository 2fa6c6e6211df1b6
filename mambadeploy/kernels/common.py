"""Shared pieces of the Triton kernels: launch arithmetic (plain functions of shapes, so an ahead-of-time compile can
reproduce every launch) and the small device functions (softplus, activations, reductions).

The kernels use Triton *builtins* only (tl.reduce, tl.associative_scan, tl.full, tl.exp, ...) plus the helpers
below, never the standard library's own @jit helpers (tl.sum, tl.max, tl.argmax, tl.sigmoid, tl.zeros, tl.cumsum, ...):
those are decorated when triton is imported, so in a process that imported triton without TRITON_INTERPRET=1 they
cannot run in the interpreted twin of these kernels (see interpret.py). On a GPU the helpers compile to what tl.sum etc.
compile to.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mambadeploy import settings  # absolute: this file also loads as the interpreted twin (interpret.py)

# Activation codes; the same numbers as mambadeploy.opset.ACTIVATION_CODES (a test checks they agree).
ACTIVATION_CODES = {"gelu": 0, "silu": 1, "gelu_tanh": 2}

# Launch sizing assumes a GPU of about this many SMs (H100: 132). Only used to pick block sizes that give at least a
# couple of programs per SM; the results are correct for any value.
TARGET_PROGRAMS = 264

LOG2E = tl.constexpr(1.4426950408889634)  # constexpr: a @jit body may read only constexpr globals


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def block_for_programs(total: int, batch: int, choices=(64, 32, 16, 8), target: int = TARGET_PROGRAMS) -> int:
    """The largest block (of `choices`, descending) that still gives batch * cdiv(total, block) >= target programs;
    the smallest choice when none does."""
    for block in choices:
        if batch * cdiv(total, block) >= target:
            return block
    return choices[-1]


def dot_upcast(dtype: torch.dtype, interpreted: bool) -> bool:
    """Triton 3.9's CPU interpreter computes bf16 tl.dot wrongly (seen here: errors of 1e10); upcasting bf16 operands to
    fp32 is exact (a bf16 product fits in fp32), so the interpreter path does that. Never on a GPU."""
    return interpreted and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs must not silently use TF32 (the fp32 runner has to match the fp32 reference token for token)."""
    return "ieee" if dtype == torch.float32 else "tf32"


_PDL_DEVICES: dict = {}  # device index -> whether it can launch with PDL (sm_90+, and a Triton that has gdc_wait)


def pdl_launch(tensor: torch.Tensor) -> dict:
    """Launch arguments for Hopper's programmatic dependent launch (PDL) of a decode kernel that takes `PDL`: the
    kernel may then start while its predecessor on the stream is still finishing (launch latency and its first weight
    loads overlap that tail) and waits (pdl_wait) before touching anything a predecessor writes. Empty — a plain
    launch — on CPU (the interpreter), below sm_90, with a Triton without grid-dependency control, or with the pdl
    setting off (mambadeploy/settings.py, MAMBADEPLOY_PDL=0)."""
    if not tensor.is_cuda or not settings.current().pdl:
        return {}
    index = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
    if index not in _PDL_DEVICES:
        cuda = getattr(getattr(tl, "extra", None), "cuda", None)
        _PDL_DEVICES[index] = torch.cuda.get_device_capability(index)[0] >= 9 and hasattr(cuda, "gdc_wait")
    return {"PDL": True, "launch_pdl": True} if _PDL_DEVICES[index] else {}


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Under PDL: wait until the previous kernel on the stream has finished and its writes are visible, then let the
    next kernel launch. Everything a kernel does before this point may read only weights (constants of the model):
    never activations, states, routing or workspaces. Allowing dependents only after the wait keeps at most two
    kernels in flight. A no-op without PDL."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def load_or_zeros(ptr, offs, mask, PRESENT: tl.constexpr, BLOCK: tl.constexpr):
    """An optional per-channel vector (a bias, D) as fp32 (0 where masked), or zeros when it is absent."""
    v = tl.full((BLOCK,), 0.0, tl.float32)
    if PRESENT:
        v = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return v


@triton.jit
def softplus(x):
    # log(1 + e^x), its two tails taken exactly enough for fp32: x for x > 20, e^x for x < -15 (which maps -inf to 0)
    return tl.where(x > 20.0, x, tl.where(x < -15.0, tl.exp(x), tl.log(1.0 + tl.exp(x))))


@triton.jit
def activate(x, ACTIVATION: tl.constexpr):
    """x in fp32. ACTIVATION: 0 exact (erf) GELU, 1 SiLU, 2 tanh-GELU."""
    if ACTIVATION == 0:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == 1:
        y = x * sigmoid(x)
    else:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        y = x * sigmoid(2.0 * inner)  # 0.5 * (1 + tanh(u)) == sigmoid(2u)
    return y


try:  # the standard library's combine functions: the interpreter recognises them and reduces with numpy
    from triton.language.standard import _argmax_combine_tie_break_left as _argmax_combine
    from triton.language.standard import _elementwise_max as _maximum
    from triton.language.standard import _sum_combine as _add
except ImportError:  # another triton: the same maths, only the interpreter's fast paths are lost

    @triton.jit
    def _add(a, b):
        return a + b

    @triton.jit
    def _maximum(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _argmax_combine(v1, i1, v2, i2):
        take1 = (v1 > v2) | ((v1 == v2) & (i1 < i2))  # ties go to the smaller index, as torch.argmax does
        return tl.where(take1, v1, v2), tl.where(take1, i1, i2)


@triton.jit
def fsum(x, AXIS: tl.constexpr):
    return tl.reduce(x, AXIS, _add)


@triton.jit
def fmax(x, AXIS: tl.constexpr):
    return tl.reduce(x, AXIS, _maximum)


@triton.jit
def cumsum(x, AXIS: tl.constexpr):
    return tl.associative_scan(x, AXIS, _add)


@triton.jit
def argmax(x, index, AXIS: tl.constexpr):
    """(max value, its index) along AXIS; `index` holds each element's index (broadcast to x's shape)."""
    return tl.reduce((x, index), AXIS, _argmax_combine)


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


# Hopper's bulk L2 prefetch: thread t of the program (t < $3) asks the copy engine to bring bytes
# [$1 + t * $2, $1 + (t + 1) * $2) into L2. Nothing is written, so nothing waits on it; it only warms L2.
_L2_PREFETCH_ASM = tl.constexpr("""{
.reg .pred pf_p;
.reg .u32 pf_t;
.reg .u64 pf_a;
mov.u32 pf_t, %tid.x;
setp.lt.u32 pf_p, pf_t, $3;
mul.wide.u32 pf_a, pf_t, $2;
add.u64 pf_a, pf_a, $1;
@pf_p cp.async.bulk.prefetch.L2.global [pf_a], $2;
mov.u32 $0, 0;
}""")
L2_PREFETCH_MIN_PIECE = 1024  # bytes: fewer, larger requests; a share below this is not prefetched


@triton.jit
def l2_prefetch(region_ptr, program, share, piece):
    """Warm L2 with this program's `share` bytes of a weight region that a LATER kernel will stream (sm_90+ only;
    never in the interpreter): bytes [program * share, (program + 1) * share) from region_ptr, one `piece` (a multiple
    of 16 bytes) per thread. A hint that changes no result; the bytes past share // piece pieces are left out."""
    start = region_ptr.to(tl.pointer_type(tl.int8)) + program.to(tl.int64) * share
    tl.inline_asm_elementwise(_L2_PREFETCH_ASM, "=r,l,r,r", [start + tl.zeros([1], tl.int32), piece, share // piece],
                              dtype=tl.int32, is_pure=False, pack=1)


def l2_prefetch_args(region: torch.Tensor | None, nbytes: int, programs: int, num_warps: int) -> dict:
    """Arguments of l2_prefetch for `programs` programs of num_warps * 32 threads sharing the first nbytes of region
    (a weight the kernel itself does not read). Empty (no prefetch) for no region, on CPU or below sm_90. Whether to
    prefetch at all is the caller's choice (torch-fast's l2_prefetch sites), not read here."""
    if region is None or not region.is_cuda:
        return {}
    if torch.cuda.get_device_capability(region.device)[0] < 9:
        return {}
    return l2_prefetch_split(region, nbytes, programs, num_warps)


def l2_prefetch_split(region: torch.Tensor, nbytes: int, programs: int, num_warps: int) -> dict:
    """The split behind l2_prefetch_args, without its device checks: each program's share (a multiple of 16 bytes)
    and piece per thread (at least L2_PREFETCH_MIN_PIECE); empty when a share is smaller than a piece."""
    nbytes = min(int(nbytes), region.numel() * region.element_size())
    share = nbytes // programs // 16 * 16
    piece = max(L2_PREFETCH_MIN_PIECE, cdiv(cdiv(share, num_warps * 32), 16) * 16)
    if share < piece:
        return {}
    return {"pf_ptr": region, "pf_share": share, "pf_piece": piece, "PREFETCH": True}
