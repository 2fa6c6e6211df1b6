"""The three registry ops as torch custom ops (`torch.ops.mambadeploy.*`), so that torch.export sees each as ONE node
with a fake (shape-only) implementation instead of tracing the reference's Python loop over time.

Their eager implementation is the reference itself; they exist only for export. `custom_op_patches()` routes the
reference layers' calls (through `models.ref_ops`) to them for the length of a `with` block and restores the originals.
"""

from __future__ import annotations

import contextlib

import torch

from ..models import ref_ops
from ..opset import ACTIVATION_CODES, REGISTRY, ROUTER_CODES

_ACTIVATION_NAMES = {code: name for name, code in ACTIVATION_CODES.items()}
_CONV_ACTIVATIONS = {0: None, 1: "silu"}  # CausalConv1d's `activation` attribute
_ROUTER_NAMES = {code: name for name, code in ROUTER_CODES.items()}
# torch custom op -> the opset.py entry it exports to (each entry names its torch op; the ops below must match)
REGISTRY_NAMES = {entry.torch_op: entry.name for entry in REGISTRY.values()}


@torch.library.custom_op("mambadeploy::selective_scan", mutates_args=())
def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
                   initial_state: torch.Tensor | None, delta_softplus: int) -> tuple[torch.Tensor, torch.Tensor]:
    y, h = ref_ops.selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), initial_state)
    return y, h.contiguous()


@selective_scan.register_fake
def _selective_scan_fake(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
    return torch.empty_like(u), u.new_empty((u.shape[0], u.shape[1], A.shape[1]), dtype=torch.float32)


@torch.library.custom_op("mambadeploy::causal_conv1d", mutates_args=())
def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  initial_state: torch.Tensor | None, activation: int) -> tuple[torch.Tensor, torch.Tensor]:
    return ref_ops.causal_conv1d_ref(x, weight, bias, initial_state, _CONV_ACTIVATIONS[activation])


@causal_conv1d.register_fake
def _causal_conv1d_fake(x, weight, bias, initial_state, activation):
    return torch.empty_like(x), x.new_empty((x.shape[0], x.shape[1], weight.shape[1]), dtype=torch.float32)


@torch.library.custom_op("mambadeploy::expert_gather", mutates_args=())
def expert_gather(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                  activation: int, top_k: int) -> torch.Tensor:
    return ref_ops.expert_gather_ref(x, w1, w2, experts, weights, _ACTIVATION_NAMES[activation])


@expert_gather.register_fake
def _expert_gather_fake(x, w1, w2, experts, weights, activation, top_k):
    return torch.empty_like(x)


# --------------------------------------------------------------------------- the decode step's ops
@torch.library.custom_op("mambadeploy::conv_update", mutates_args=())
def conv_update(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                activation: int) -> tuple[torch.Tensor, torch.Tensor]:
    return ref_ops.causal_conv1d_update_ref(x, conv_state, weight, bias, _CONV_ACTIVATIONS[activation])


@conv_update.register_fake
def _conv_update_fake(x, conv_state, weight, bias, activation):
    return torch.empty_like(x), torch.empty_like(conv_state, dtype=torch.float32)


@torch.library.custom_op("mambadeploy::state_update", mutates_args=())
def state_update(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                 C: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None, dt_bias: torch.Tensor | None,
                 dt_softplus: int) -> tuple[torch.Tensor, torch.Tensor]:
    return ref_ops.selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus))


@state_update.register_fake
def _state_update_fake(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    return torch.empty_like(x), torch.empty_like(state, dtype=torch.float32)


@torch.library.custom_op("mambadeploy::add_rms_norm", mutates_args=())
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    return ref_ops.add_rms_norm_ref(x, residual, weight, epsilon)


@add_rms_norm.register_fake
def _add_rms_norm_fake(x, residual, weight, epsilon):
    return torch.empty_like(x), torch.empty_like(residual, dtype=torch.float32)


@torch.library.custom_op("mambadeploy::routed_moe", mutates_args=())
def routed_moe(x: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor | None, w1: torch.Tensor,
               w2: torch.Tensor, router: int, top_k: int, activation: int) -> torch.Tensor:
    return ref_ops.routed_moe_ref(x, router_weight, router_bias, w1, w2, _ROUTER_NAMES[router], top_k,
                                  _ACTIVATION_NAMES[activation])


@routed_moe.register_fake
def _routed_moe_fake(x, router_weight, router_bias, w1, w2, router, top_k, activation):
    return torch.empty_like(x)


@torch.library.custom_op("mambadeploy::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor,
                     value_cache: torch.Tensor, pos: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels.decode_attention import decode_attention_update_ref

    return decode_attention_update_ref(q, k, v, key_cache, value_cache, pos, scale)


@decode_attention.register_fake
def _decode_attention_fake(q, k, v, key_cache, value_cache, pos, scale):
    return torch.empty_like(q), torch.empty_like(key_cache), torch.empty_like(value_cache)


@torch.library.custom_op("mambadeploy::sparse_linear", mutates_args=())
def sparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mode: float,
                  threshold: float) -> torch.Tensor:
    from ..kernels.sparse_gemv import sparse_linear_ref

    return sparse_linear_ref(x, weight, bias, mode, threshold)


@sparse_linear.register_fake
def _sparse_linear_fake(x, weight, bias, mode, threshold):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# --------------------------------------------------------------------------- the patches
def _scan_via_op(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None):
    return torch.ops.mambadeploy.selective_scan(u, delta, A, B, C, D, z, delta_bias, initial_state, int(delta_softplus))


def _conv_via_op(x, weight, bias=None, initial_state=None, activation=None):
    code = {None: 0, "silu": 1}[activation]
    return torch.ops.mambadeploy.causal_conv1d(x, weight, bias, initial_state, code)


def _gather_via_op(x, w1, w2, experts, weights, activation):
    return torch.ops.mambadeploy.expert_gather(x, w1, w2, experts, weights, ACTIVATION_CODES[activation],
                                               experts.shape[1])


@contextlib.contextmanager
def patched(obj, **replacements):
    """Set attributes of `obj` (a module, class or instance) for the length of the block, then restore them, also on
    error; an attribute the object did not hold itself (an instance reading its class) is deleted again."""
    own = vars(obj)
    saved = {name: (name in own, own.get(name)) for name in replacements}
    try:
        for name, value in replacements.items():
            setattr(obj, name, value)
        yield
    finally:
        for name, (had, value) in saved.items():
            if had:
                setattr(obj, name, value)
            else:
                delattr(obj, name)


def _add_rms_norm_rows_via_op(x, residual, weight, eps):
    """AddRMSNorm over the (B, L, d) activations of a prompt, as the op's (rows, d) form (what its TensorRT plugin and
    CUDA kernels take): reshapes around one node."""
    shape = residual.shape
    y, r = torch.ops.mambadeploy.add_rms_norm(x.reshape(-1, shape[-1]), residual.reshape(-1, shape[-1]), weight,
                                              float(eps))
    return y.reshape(shape), r.reshape(shape)


def custom_op_patches():
    """Prefill: the scan, the causal conv, the expert gather and each residual add + RMSNorm become single custom-op
    nodes. (The MoE layer stays router in standard ops + TopKExpertGather: the prompt's pairs are grouped by expert for
    the grouped GEMM, which RoutedMoE's decode form does not need.)"""
    return patched(ref_ops, selective_scan_ref=_scan_via_op, causal_conv1d_ref=_conv_via_op,
                   expert_gather_ref=_gather_via_op, add_rms_norm_ref=_add_rms_norm_rows_via_op)


def _conv_update_via_op(x, conv_state, weight, bias=None, activation=None):
    return torch.ops.mambadeploy.conv_update(x, conv_state, weight, bias, {None: 0, "silu": 1}[activation])


def _state_update_via_op(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True):
    return torch.ops.mambadeploy.state_update(state, x, dt, A, B, C, D, z, dt_bias, int(dt_softplus))


def _add_rms_norm_via_op(x, residual, weight, eps):
    return torch.ops.mambadeploy.add_rms_norm(x, residual, weight, float(eps))


def _routed_moe_via_op(x, router_weight, router_bias, w1, w2, router, top_k, activation):
    return torch.ops.mambadeploy.routed_moe(x, router_weight, router_bias, w1, w2, ROUTER_CODES[router], int(top_k),
                                            ACTIVATION_CODES[activation])


def decode_patches():
    """Decode: the conv step, the state update, each residual add + RMSNorm and each MoE layer become single custom-op
    nodes (expanded into standard ops afterwards for --ops portable)."""
    return patched(ref_ops, causal_conv1d_update_ref=_conv_update_via_op,
                   selective_state_update_ref=_state_update_via_op, add_rms_norm_ref=_add_rms_norm_via_op,
                   routed_moe_ref=_routed_moe_via_op)


def attention_step_via(op):
    """layers.Attention.step through one node `op(q, k, v, key_cache, value_cache, pos) -> (out, caches)`: the
    projections stay standard MatMuls; q (B, H, hd), k/v (B, KV, hd) in the cache dtype."""

    def step(self, x, key_cache, value_cache, pos):
        from ..models import sparsity

        q = sparsity.linear(self, "q_proj", x).unflatten(-1, (self.n_heads, self.head_dim))
        k = sparsity.linear(self, "k_proj", x).unflatten(-1, (self.n_kv, self.head_dim)).to(key_cache.dtype)
        v = sparsity.linear(self, "v_proj", x).unflatten(-1, (self.n_kv, self.head_dim)).to(value_cache.dtype)
        out, key_cache, value_cache = op(q, k, v, key_cache, value_cache, pos)
        return sparsity.linear(self, "o_proj", out.flatten(1)), key_cache, value_cache

    return step


def _decode_attention_via_op(q, k, v, key_cache, value_cache, pos):
    return torch.ops.mambadeploy.decode_attention(q, k, v, key_cache, value_cache, pos, 0.0)


def attention_patches():
    """--ops custom decode: each attention layer's step becomes one DecodeAttention node (write the slot, attend the
    filled slots); the other modes keep the reference attention."""
    from ..models import layers

    return patched(layers.Attention, step=attention_step_via(_decode_attention_via_op))


def _sparse_linear_via_op(self, x, weight, bias=None):
    """sparsity.Sparsifier.linear as one SparseLinear node: the linear's bias and the folded one summed first, as the
    reference does. MoE experts' (E, ...) weights keep the reference's standard ops (sparse_moe_ref never calls this)."""
    b = self.folded_bias if bias is None else (bias if self.folded_bias is None else bias + self.folded_bias)
    rows = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x  # the node takes (rows, K)
    y = torch.ops.mambadeploy.sparse_linear(rows, weight, b, self.mode, self.threshold)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


def sparse_linear_patches():
    """--ops custom decode: every SCAP-sparsified linear (models/sparsity.py) becomes one SparseLinear node; the other
    modes keep the reference's mask in standard ops (what the node's portable expansion also writes)."""
    from ..models import sparsity

    return patched(sparsity.Sparsifier, linear=_sparse_linear_via_op)
