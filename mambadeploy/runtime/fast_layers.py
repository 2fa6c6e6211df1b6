"""torch-fast's view of one block: its weights prepared once for the kernels (views of the model's parameters, fp32
copies of the small vectors, the SCAP sites of a sparse checkpoint)."""

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
    sparse: dict | None = None  # SCAP: linear name -> fast_sparse.SparseSite (experts: "fc1", "fc2", or None)


@torch.no_grad()
def prepare_layer(index: int, block, config, scap_table: dict | None) -> FastLayer:
    """The FastLayer of model block `index`; scap_table: the checkpoint is SCAP-sparse, its sites run by this
    per-site table (fast_sparse.site_table), which decides where transposed weights are needed."""
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
    if scap_table is not None:
        from .fast_sparse import prepare_sites

        layer.sparse = prepare_sites(block, index, config, scap_table)
    return layer
