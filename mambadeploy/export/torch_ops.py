"""The three registry ops as torch custom ops (`torch.ops.mambadeploy.*`), so that torch.export sees each as ONE node
with a fake (shape-only) implementation instead of tracing the reference's Python loop over time.

Their eager implementation is the reference itself; they exist only for export. `custom_op_patches()` routes the
reference layers' calls (through `models.ref_ops`) to them for the length of a `with` block and restores the originals.
"""

from __future__ import annotations

import contextlib

import torch

from ..models import ref_ops
from ..opset import ACTIVATION_CODES

_ACTIVATION_NAMES = {code: name for name, code in ACTIVATION_CODES.items()}
_CONV_ACTIVATIONS = {0: None, 1: "silu"}  # CausalConv1d's `activation` attribute
# torch custom op -> the opset.py entry it exports to
REGISTRY_NAMES = {"selective_scan": "SelectiveScan", "causal_conv1d": "CausalConv1d", "expert_gather": "TopKExpertGather"}


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


# --------------------------------------------------------------------------- the patches
def _scan_via_op(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None):
    return torch.ops.mambadeploy.selective_scan(u, delta, A, B, C, D, z, delta_bias, initial_state, int(delta_softplus))


def _conv_via_op(x, weight, bias=None, initial_state=None, activation=None):
    code = {None: 0, "silu": 1}[activation]
    return torch.ops.mambadeploy.causal_conv1d(x, weight, bias, initial_state, code)


def _gather_via_op(x, w1, w2, experts, weights, activation):
    return torch.ops.mambadeploy.expert_gather(x, w1, w2, experts, weights, ACTIVATION_CODES[activation],
                                               experts.shape[1])


def gather_path_only(x, w1, w2, experts, weights, activation):
    """expert_gather_ref's gather branch, whatever the token count: a decode step (few tokens) reads only the chosen
    experts' weights. The reference picks its branch from T*k >= E, a guard on the dynamic batch size that torch.export
    must not specialise on. index_select on the stacked weights exports as one Gather reading the parameter itself
    (advanced indexing would export a transformed copy of the weights)."""
    T, k = experts.shape
    idx = experts.reshape(-1)
    xk = x.unsqueeze(1).expand(T, k, x.shape[-1]).reshape(T * k, x.shape[-1], 1)
    h = torch.matmul(w1.index_select(0, idx), xk).squeeze(-1)  # (T*k, 2F)
    gate, up = h.chunk(2, dim=-1)
    a = (ref_ops.activation_ref(gate, activation) * up).unsqueeze(-1)
    y = torch.matmul(w2.index_select(0, idx), a).squeeze(-1).reshape(T, k, -1)  # (T, k, d)
    return (y.float() * weights.float().unsqueeze(-1)).sum(1).to(x.dtype)


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


def custom_op_patches():
    """Prefill: the scan, the causal conv and the expert gather become single custom-op nodes."""
    return patched(ref_ops, selective_scan_ref=_scan_via_op, causal_conv1d_ref=_conv_via_op,
                   expert_gather_ref=_gather_via_op)


def decode_patches():
    """Decode: standard ops only; the MoE always gathers the chosen experts' weights."""
    return patched(ref_ops, expert_gather_ref=gather_path_only)
