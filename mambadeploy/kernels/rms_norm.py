"""Fused residual add + RMSNorm (and plain RMSNorm), and the model's final norm, in Triton, beside the references.

Grid: one program per row (the whole row in one tile). residual' = residual + x in fp32 (the model's residual stream is
fp32); out = residual' * rsqrt(mean(residual'^2) + eps) * weight, in x's dtype. The residual may be updated in place
(residual_out=residual): each element is read and written by the same thread.
final_norm: the head's norm, (residual + x) rounded to the model dtype, then LayerNorm (with bias) or RMSNorm, as the
reference model computes it before the LM head (one launch for what eager torch does in six).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mambadeploy.models.ref_ops import add_rms_norm_ref, layer_norm_ref, rms_norm_ref  # noqa: F401  (re-exported)

from .common import fsum, next_pow2, pdl_launch, pdl_wait
from .interpret import kernel_for


@triton.jit
def add_rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    d, eps,
    s_x, s_r, s_o, s_ro,
    HAS_X: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False,
    STORE_RESIDUAL: tl.constexpr = True, ROUND_IN: tl.constexpr = False, LAYER: tl.constexpr = False, b_ptr=None,
    GATHER: tl.constexpr = False, ids_ptr=None,
):
    """ROUND_IN: the sum is rounded to out's dtype before the norm (the head normalises h.to(model dtype)).
    LAYER: LayerNorm with bias b_ptr (mean subtracted) instead of RMSNorm.
    GATHER: x's row is ids[row] (an embedding lookup; x is the table)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < d
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # a weight: before the PDL wait
    if LAYER:
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    pdl_wait(PDL)
    v = tl.full((BLOCK,), 0.0, tl.float32)
    if HAS_X:
        x_row = tl.load(ids_ptr + row).to(tl.int64) if GATHER else row
        v += tl.load(x_ptr + x_row * s_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        v += tl.load(res_ptr + row * s_r + offs, mask=mask, other=0.0).to(tl.float32)
    if STORE_RESIDUAL:
        tl.store(res_out_ptr + row * s_ro + offs, v, mask=mask)
    if ROUND_IN:
        v = v.to(out_ptr.dtype.element_ty).to(tl.float32)
    if LAYER:
        v = tl.where(mask, v - fsum(v, 0) / d, 0.0)
    rstd = 1.0 / tl.sqrt(fsum(v * v, 0) / d + eps)
    y = v * rstd * w
    if LAYER:
        y += b
    tl.store(out_ptr + row * s_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def launch_config(shapes, dtypes=None, interpret: bool = False) -> dict:
    """shapes: (x (..., d), ...): one program per row of d."""
    d = shapes[0][-1]
    rows = 1
    for s in shapes[0][:-1]:
        rows *= s
    block = next_pow2(d)
    return {"kernel": "add_rms_norm_kernel", "grid": (rows,), "num_warps": max(1, min(8, block // 256)),
            "num_stages": 1, "constexprs": {"BLOCK": block}}


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (rows, d) without a copy when the last dim is contiguous and the rest flattens (else a copy)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


def _launch(x, residual, weight, eps, out, residual_out, **flags):
    ref = x if x is not None else residual
    d = ref.shape[-1]
    x2 = _rows(x) if x is not None else None
    r2 = _rows(residual) if residual is not None else None
    o2 = out.view(-1, d)
    ro2 = residual_out.view(-1, d) if residual_out is not None else None
    rows = o2.shape[0]
    kernel = kernel_for(add_rms_norm_kernel, ref)
    cfg = launch_config(((rows, d),))
    kernel[cfg["grid"]](
        x2 if x2 is not None else o2, r2 if r2 is not None else o2, weight, o2, ro2 if ro2 is not None else o2,
        d, float(eps),
        x2.stride(0) if x2 is not None else 0, r2.stride(0) if r2 is not None else 0, o2.stride(0),
        ro2.stride(0) if ro2 is not None else 0,
        HAS_X=x is not None, HAS_RESIDUAL=residual is not None, STORE_RESIDUAL=residual_out is not None, **flags,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **cfg["constexprs"], **pdl_launch(ref),
    )


def add_rms_norm(x, residual, weight, eps, *, residual_out=None, out=None):
    """Same contract as add_rms_norm_ref: returns (rms_norm(residual + x) in x.dtype, residual + x in fp32).
    residual_out: where to write the new residual (pass `residual` itself to update it in place; it must be
    contiguous fp32); default a new tensor. out: where to write the normalised rows (default new)."""
    if x.shape != residual.shape:
        raise ValueError(f"add_rms_norm: x {tuple(x.shape)} and residual {tuple(residual.shape)} differ")
    if residual_out is None:
        residual_out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    elif residual_out.dtype != torch.float32 or not residual_out.is_contiguous():
        raise ValueError("add_rms_norm: residual_out must be a contiguous fp32 tensor")
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, residual, weight, eps, out, residual_out)
    return out, residual_out


def rms_norm(x, weight, eps, *, out=None, out_dtype=None):
    """Same contract as rms_norm_ref: x (..., d) -> rms_norm(x) in x.dtype (or out_dtype)."""
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    _launch(x, None, weight, eps, out, None)
    return out


def final_norm_ref(x, residual, weight, bias, eps, kind):
    """The reference model's head norm: norm((residual + x) in fp32, rounded to x.dtype), in x.dtype. kind:
    "layernorm" (with bias) or "rmsnorm"."""
    h = (residual.float() + x.float()).to(x.dtype)
    return layer_norm_ref(h, weight, bias, eps) if kind == "layernorm" else rms_norm_ref(h, weight, eps)


def final_norm(x, residual, weight, bias, eps, kind, *, out=None):
    """Same contract as final_norm_ref, in one launch; the residual is read, not updated. x (..., d) in the model
    dtype, residual (..., d) fp32."""
    if kind not in ("layernorm", "rmsnorm"):
        raise ValueError(f"final_norm: kind {kind!r} not in ('layernorm', 'rmsnorm')")
    if x.shape != residual.shape:
        raise ValueError(f"final_norm: x {tuple(x.shape)} and residual {tuple(residual.shape)} differ")
    if kind == "layernorm" and bias is None:
        raise ValueError("final_norm: layernorm needs its bias")
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, residual, weight, eps, out, None, ROUND_IN=True, LAYER=kind == "layernorm", b_ptr=bias)
    return out


def embed_rms_norm(ids, table, weight, eps, *, residual_out, out=None):
    """The first block's norm straight from the token ids: residual_out <- table[ids] in fp32 (the residual stream's
    start), returns rms_norm of it in table.dtype; one launch for lookup, widening and norm. ids (T,) integer,
    table (V, d), residual_out (T, d) contiguous fp32. Equal to rms_norm_ref(table[ids].float(), ...) in
    table.dtype. Ids are not range-checked here (the runner checks them before the step)."""
    T, d = ids.shape[0], table.shape[1]
    if ids.dim() != 1 or residual_out.shape != (T, d) or residual_out.dtype != torch.float32 or \
            not residual_out.is_contiguous():
        raise ValueError(f"embed_rms_norm: ids {tuple(ids.shape)} must be (T,) and residual_out "
                         f"{residual_out.dtype} {tuple(residual_out.shape)} contiguous fp32 ({T}, {d})")
    if table.stride(1) != 1:
        raise ValueError("embed_rms_norm: the table's rows must be contiguous")
    if out is None:
        out = torch.empty(T, d, dtype=table.dtype, device=table.device)
    _launch(table, None, weight, eps, out, residual_out, GATHER=True, ids_ptr=ids)
    return out
