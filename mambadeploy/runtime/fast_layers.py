"""torch-fast's view of one block: its weights prepared once for the kernels (views of the model's parameters, fp32
copies of the small vectors, the transposed weights of SCAP-sparse projections)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FastLayer:
    """One block's weights, prepared once (views of the model's parameters, plus fp32 copies of the small vectors)."""
    index: int
    mixer: str
    ffn: str
    mixer_norm: torch.Tensor | None = None
    ffn_norm: torch.Tensor | None = None
    mamba: object = None  # the reference MambaMixer (for its Linear weights)
    A: torch.Tensor | None = None  # -exp(A_log), fp32
    D: torch.Tensor | None = None  # fp32
    dt_bias: torch.Tensor | None = None  # fp32
    conv_weight: torch.Tensor | None = None  # (d_inner, d_conv)
    attention: object = None  # the reference Attention
    moe: object = None  # the reference MoE
    fused_route: bool = False  # norm + router in one kernel (router tile small enough)
    mlp: object = None  # the reference GatedMLP
    sparse: dict | None = None  # SCAP: linear name -> (transposed weight, mode, threshold, bias incl. the folded one)


@torch.no_grad()
def prepare_layer(index: int, block, config, sparse: bool) -> FastLayer:
    """The FastLayer of model block `index`; sparse: the checkpoint is SCAP-sparse (prepare its transposed weights)."""
    from ..kernels import moe_routing

    layer = FastLayer(index, block.kind.mixer, block.kind.ffn)
    if block.mixer_norm is not None:
        layer.mixer_norm = block.mixer_norm.weight
    if block.ffn_norm is not None:
        layer.ffn_norm = block.ffn_norm.weight
    if layer.mixer == "mamba":
        m = block.mixer
        layer.mamba = m
        layer.A = (-torch.exp(m.A_log.float())).contiguous()
        layer.D = m.D.float().contiguous()
        layer.dt_bias = m.dt_proj.bias.float().contiguous()
        layer.conv_weight = m.conv_weight
    elif layer.mixer == "attention":
        layer.attention = block.mixer
    if layer.ffn == "moe":
        layer.moe = block.ffn
        shapes = ((1, config.d_model), tuple(block.ffn.router.weight.shape))
        layer.fused_route = moe_routing.norm_route_launch_config(shapes) is not None
    elif layer.ffn == "mlp":
        layer.mlp = block.ffn
    if sparse:
        layer.sparse = prepare_sparse(block)
    return layer


def prepare_sparse(block) -> dict:
    """Transposed weights (input feature k owns the contiguous row k, so a dropped activation skips a row) and
    merged biases of the sparsified Mamba projections and MoE expert GEMVs. An MoE layer gets both fc1 and fc2
    (the one not sparsified with threshold −1: |x| > −1 keeps every entry, the dense product)."""
    out = {}
    mixer, ffn = block.mixer, block.ffn
    if block.kind.mixer == "mamba" and mixer.sparse is not None:
        for name, sp in mixer.sparse.items():
            lin = getattr(mixer, name)
            bias = lin.bias if sp.folded_bias is None else (
                sp.folded_bias if lin.bias is None else lin.bias + sp.folded_bias)
            out[name] = (lin.weight.t().contiguous(), sp.mode, sp.threshold, bias)
    if block.kind.ffn == "moe" and ffn.sparse is not None:
        for name, w in (("fc1", ffn.w1), ("fc2", ffn.w2)):
            sp = ffn.sparse[name] if name in ffn.sparse else None  # noqa: SIM401 (ModuleDict has no get)
            mode, threshold, bias = (0.0, -1.0, None) if sp is None else (sp.mode, sp.threshold, sp.folded_bias)
            out[name] = (w.transpose(1, 2).contiguous(), mode, threshold, bias)
    return out or None
