"""Reference ops in plain PyTorch, fp32 math inside: the `_ref` twins every fast kernel and plugin is checked against.

Shapes follow mamba_ssm's conventions (channels before time): u: (batch, dim, seqlen). States are fp32.
Conv state convention: (batch, dim, d_conv) holds the last d_conv inputs of the conv, newest last; a sequence conv uses its
last d_conv - 1 columns as left context, a step shifts it by one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------- selective scan
SCAN_REF_BLOCK = 1024  # time steps whose decay / drive terms selective_scan_ref materialises at once


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None):
    """Mamba-1 selective scan over a sequence.

    u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, N, L); D, delta_bias: (dim,);
    initial_state: (batch, dim, N) or None (zeros).
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t;  y_t = <h_t, C_t> + D * u_t;  y *= silu(z).
    Returns (y: (batch, dim, L) in u.dtype, last_state: (batch, dim, N) fp32).
    """
    dtype_in = u.dtype
    u, delta, A, B, C = (t.float() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.float()[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, L = u.shape
    h = u.new_zeros(batch, dim, A.shape[1]) if initial_state is None else initial_state.float().clone()
    ys = []
    # decay and drive (batch, dim, T, N) per block of SCAN_REF_BLOCK steps: the same numbers as one block of L, with
    # memory that does not grow with the prompt (at 128K tokens and d_inner 8192 one block of L is 68 GB a layer)
    for t0 in range(0, L, SCAN_REF_BLOCK):
        sl = slice(t0, min(t0 + SCAN_REF_BLOCK, L))
        decay = torch.exp(delta[:, :, sl].unsqueeze(-1) * A[None, :, None, :])
        drive = (delta[:, :, sl] * u[:, :, sl]).unsqueeze(-1) * B[:, :, sl].transpose(1, 2)[:, None, :, :]
        for t in range(decay.shape[2]):
            h = decay[:, :, t] * h + drive[:, :, t]
            ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t0 + t]))
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + u * D.float()[None, :, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype_in), h


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True):
    """One decode step of the selective scan.

    state: (batch, dim, N) fp32; x, dt, z: (batch, dim); A: (dim, N); B, C: (batch, N); D, dt_bias: (dim,).
    Returns (y: (batch, dim) in x.dtype, new_state: (batch, dim, N) fp32). Pure: `state` is not modified.
    """
    dtype_in = x.dtype
    x, dt, A, B, C = (t.float() for t in (x, dt, A, B, C))
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    new_state = torch.exp(dt.unsqueeze(-1) * A) * state.float() + (dt * x).unsqueeze(-1) * B.unsqueeze(1)
    y = torch.einsum("bdn,bn->bd", new_state, C)
    if D is not None:
        y = y + x * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype_in), new_state


# --------------------------------------------------------------------------- causal depthwise conv1d
def causal_conv1d_ref(x, weight, bias=None, initial_state=None, activation=None):
    """Causal depthwise conv over time.

    x: (batch, dim, L); weight: (dim, K); bias: (dim,); initial_state: (batch, dim, K) or None (zeros).
    Returns (out: (batch, dim, L) in x.dtype, final_state: (batch, dim, K) fp32 = last K inputs, newest last).
    """
    dtype_in = x.dtype
    batch, dim, L = x.shape
    K = weight.shape[1]
    if initial_state is None:
        initial_state = x.new_zeros(batch, dim, K, dtype=torch.float32)
    full = torch.cat([initial_state.float(), x.float()], dim=-1)  # (batch, dim, K + L)
    out = F.conv1d(full[:, :, 1:], weight.float().unsqueeze(1), None if bias is None else bias.float(), groups=dim)
    if activation == "silu":
        out = F.silu(out)
    elif activation is not None:
        raise ValueError(f"unsupported activation {activation!r}")
    return out.to(dtype_in), full[:, :, -K:].contiguous()


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation=None):
    """One step of the causal conv. x: (batch, dim); conv_state: (batch, dim, K) fp32.

    Returns (out: (batch, dim) in x.dtype, new_state: (batch, dim, K) fp32). Pure.
    """
    new_state = torch.cat([conv_state[:, :, 1:].float(), x.float().unsqueeze(-1)], dim=-1)
    out = (new_state * weight.float()).sum(-1)
    if bias is not None:
        out = out + bias.float()
    if activation == "silu":
        out = F.silu(out)
    elif activation is not None:
        raise ValueError(f"unsupported activation {activation!r}")
    return out.to(x.dtype), new_state


# --------------------------------------------------------------------------- norms
def rms_norm_ref(x, weight, eps):
    """x: (..., d); weight: (d,). fp32 math, result in x.dtype."""
    xf = x.float()
    # x / sqrt(...) rather than x * rsqrt(...): traced, this is Pow-ReduceMean-Add-Sqrt-Div-Mul, the pattern ONNX
    # Runtime fuses into one SimplifiedLayerNormalization kernel (the rsqrt form stays 7 kernels a norm)
    y = xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def add_rms_norm_ref(x, residual, weight, eps):
    """Fused residual add + RMSNorm: residual' = residual + x (fp32); returns (rms_norm(residual'), residual')."""
    res = residual.float() + x.float()
    return rms_norm_ref(res, weight, eps).to(x.dtype), res


def layer_norm_ref(x, weight, bias, eps):
    return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), None if bias is None else bias.float(), eps).to(x.dtype)


# --------------------------------------------------------------------------- activations and routers
def activation_ref(x, name):
    if name == "gelu":
        return F.gelu(x)  # exact erf GELU, as BlackMamba's released code computes
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "silu":
        return F.silu(x)
    raise ValueError(f"unknown activation {name!r}")


def route_ref(logits, router, top_k):
    """Router: logits (tokens, E) -> (weights (tokens, k) fp32, experts (tokens, k) int64).

    sigmoid_top1: BlackMamba inference: argmax of the logits, weight = sigmoid(logit) of that expert.
    softmax_topk: softmax in fp32, top-k, no renormalisation (Switch / MoE-Mamba with k=1, Jamba with k=2).
    """
    logits = logits.float()
    if router == "sigmoid_top1":
        idx = logits.argmax(-1, keepdim=True)
        return torch.sigmoid(logits.gather(-1, idx)), idx
    if router == "softmax_topk":
        probs = torch.softmax(logits, dim=-1)
        weights, idx = torch.topk(probs, top_k, dim=-1)
        return weights, idx
    raise ValueError(f"unknown router {router!r}")


def gated_ffn_ref(x, w1, w2, activation):
    """Dense gated MLP: x (tokens, d); w1 (2F, d) = [gate; up]; w2 (d, F). act(x w_gate) * (x w_up), then w2."""
    h = F.linear(x, w1)
    gate, up = h.chunk(2, dim=-1)
    return F.linear(activation_ref(gate, activation) * up, w2)


def expert_gather_ref(x, w1, w2, experts, weights, activation):
    """Top-k expert gather as a static gather over stacked weights (no data-dependent shapes).

    x: (T, d); w1: (E, 2F, d); w2: (E, d, F); experts: (T, k) int64; weights: (T, k).
    Returns sum_j weights[:, j] * ffn_{experts[:, j]}(x), (T, d) in x.dtype, fp32 accumulation over the k experts.
    When T*k >= E it is cheaper to run every expert and combine with a (T, E) weight matrix that is zero off the chosen
    experts; otherwise the chosen experts' weights are gathered. Both are shape-static; the choice depends on shapes only.
    """
    T, d = x.shape
    E = w1.shape[0]
    if T * experts.shape[1] >= E:
        combine = torch.zeros(T, E, dtype=torch.float32, device=x.device).scatter_add(1, experts, weights.float())
        h = torch.einsum("td,efd->tef", x, w1)  # (T, E, 2F)
        gate, up = h.chunk(2, dim=-1)
        y = torch.einsum("tef,edf->ted", activation_ref(gate, activation) * up, w2)  # (T, E, d)
        return (y.float() * combine.unsqueeze(-1)).sum(1).to(x.dtype)
    g1 = w1[experts]  # (T, k, 2F, d)
    g2 = w2[experts]  # (T, k, d, F)
    h = torch.einsum("td,tkfd->tkf", x, g1)
    gate, up = h.chunk(2, dim=-1)
    y = torch.einsum("tkf,tkdf->tkd", activation_ref(gate, activation) * up, g2)
    return (y.float() * weights.float().unsqueeze(-1)).sum(1).to(x.dtype)


def routed_moe_ref(x, router_weight, router_bias, w1, w2, router, top_k, activation):
    """A whole MoE layer: router Linear (logits in x.dtype, as the model's nn.Linear gives them), route_ref, then the
    chosen experts. x: (T, d); router_weight: (E, d); router_bias: (E,) or None. Returns (T, d) in x.dtype."""
    weights, experts = route_ref(F.linear(x, router_weight, router_bias), router, top_k)
    return expert_gather_ref(x, w1, w2, experts, weights, activation)
