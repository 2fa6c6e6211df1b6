"""`--ops contrib`: ONNX Runtime's own fused ops (domain `com.microsoft`, ORT >= 1.31) where they compute what the
reference computes — checked numerically, not assumed (tests/export/test_contrib.py):

* CausalConvWithState (input (B, C, L), weight (C, 1, K), past_state (B, C, K-1), fused SiLU) fits every Mamba conv, in
  prefill and in the decode step. Our state keeps K columns (mamba_ssm's convention, the oldest one never read), so the
  state output is rebuilt from the last K inputs with a small Concat/Slice.
* MoE fits gated-SiLU experts: activation_type "swiglu" with alpha 1, beta 0, no clamp is silu(gate) * up; the CPU kernel
  wants gate/up rows interleaved (swiglu_fusion=1), so w1 (E, [gate; up], d) is re-laid out in the graph (ORT folds it at
  load). Softmax top-k without renormalisation (MoE-Mamba, Jamba) is normalize_routing_weights=0. BlackMamba's sigmoid
  top-1 fits as k=1 with normalize_routing_weights=1 (weight 1 on the argmax expert) times sigmoid(max logit) outside.
  Does NOT fit: erf-GELU gated experts (BlackMamba's released code): ORT MoE has no gated exact GELU ("gelu" is ungated;
  "geglu" is tanh-GELU and CUDA-only). Those layers keep the portable expert gather.
* GroupQueryAttention computes the decode step's attention (Jamba): the new K/V are written at slot pos[b] of the
  preallocated cache (past and present both (B, KV, max_len, hd); seqlens_k = pos, total_sequence_length =
  max(pos) + 1) and only slots [0, pos[b]] are attended, GQA inside the op (flash / memory-efficient on CUDA). ORT's
  CPU kernel leaves the slots past each row's fill zero, as the reference's cache holds them. The prefill graph keeps
  the reference attention: GQA reads a first prompt right-padded (ours are left-padded) and takes S > 1 new tokens
  beside a past cache at batch 1 only (ORT 1.32: "batch_size must be 1 when sequence_length > 1 and past context is
  given"). GQA wants head_dim a multiple of 8 (jamba-tiny's 12 is not: its decode keeps the reference attention).
  ORT 1.32 CPU runs it in fp32 and fp16, not bf16. Opset-23 `Attention` also runs on ORT 1.32 CPU, but its present
  cache is past concatenated with the new keys (it grows by one slot a step) and a mask spans the whole past: it fits
  neither a fixed-length cache nor a cost that follows the fill, so GroupQueryAttention was chosen.
* No selective-scan op exists in ORT: the scan stays portable (ONNX Scan).
"""

from __future__ import annotations

import functools

import torch

from ..models import layers, ref_ops
from ..models.config import ModelConfig
from .torch_ops import attention_step_via, patched

MS_DOMAIN = "com.microsoft"
_ROUTERS = {"sigmoid_top1": 0, "softmax_topk": 1}
_ROUTER_NAMES = {v: k for k, v in _ROUTERS.items()}


def moe_fits(config: ModelConfig) -> bool:
    """Whether com.microsoft.MoE computes this model's MoE layers (see the module docstring)."""
    return config.moe is not None and config.moe.activation == "silu" and config.moe.router in _ROUTERS


def gqa_fits(config: ModelConfig) -> bool:
    """Whether com.microsoft.GroupQueryAttention computes this model's decode attention (head_dim % 8 == 0)."""
    return config.has_attention and config.attention.head_dim % 8 == 0


def what_fits(config: ModelConfig) -> dict:
    """For the manifest: which contrib op replaces what, and why not where it does not."""
    has_mamba = any(l.mixer == "mamba" for l in config.layers)
    has_moe = any(l.ffn == "moe" for l in config.layers)
    out = {"CausalConvWithState": "mamba conv (prefill and decode)" if has_mamba else "unused (no Mamba layer)",
           "SelectiveScan": "no ORT op: portable Scan",
           "GroupQueryAttention": "decode attention and prefill_state's (the one-pass prefill: reference attention; "
                                  "ORT's CUDA kernel is fp16/bf16 only)" if gqa_fits(config)
           else "unused (no attention layer)" if not config.has_attention
           else f"does not fit (head_dim {config.attention.head_dim}, ORT wants a multiple of 8): reference attention"}
    if not has_moe:
        out["MoE"] = "unused (no MoE layer)"
    elif moe_fits(config):
        out["MoE"] = f"{config.moe.router} top-{config.moe.top_k}, gated SiLU experts"
    else:
        out["MoE"] = (f"does not fit ({config.moe.activation}-gated experts; ORT MoE gates only SiLU, GEGLU is "
                      "tanh-GELU on CUDA only): portable expert gather")
    return out


# --------------------------------------------------------------------------- ONNX schemas (the subset we emit)
@functools.cache
def register_schemas() -> None:
    """onnx needs these to type-check, infer shapes and let onnxscript emit the nodes; ORT has its own copies."""
    import onnx
    import onnx.reference
    from onnx import defs
    # standard CausalConvWithState, opset 27), so it must see the schemas before ours joins them

    P, Opt, A = defs.OpSchema.FormalParameter, defs.OpSchema.FormalParameterOption, defs.OpSchema.Attribute
    T = [("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")]
    INT, FLT, STR = defs.OpSchema.AttrType.INT, defs.OpSchema.AttrType.FLOAT, defs.OpSchema.AttrType.STRING

    def same_as_input(ctx):
        ctx.set_output_type(0, ctx.get_input_type(0))

    def conv_infer(ctx):
        x, w = ctx.get_input_type(0), ctx.get_input_type(1)
        ctx.set_output_type(0, x)
        state = onnx.TypeProto()
        state.CopyFrom(x)
        dims = state.tensor_type.shape.dim
        if len(dims) == 3 and len(w.tensor_type.shape.dim) == 3 and w.tensor_type.shape.dim[2].HasField("dim_value"):
            dims[2].Clear()
            dims[2].dim_value = w.tensor_type.shape.dim[2].dim_value - 1
        ctx.set_output_type(1, state)

    def gqa_infer(ctx):  # output like the query; present like the past (a cache of fixed length)
        ctx.set_output_type(0, ctx.get_input_type(0))
        ctx.set_output_type(1, ctx.get_input_type(3))
        ctx.set_output_type(2, ctx.get_input_type(4))

    def optional(name):
        return P(name, "T", "", param_option=Opt.Optional)

    schemas = [
        (defs.OpSchema("MoE", MS_DOMAIN, 1, inputs=[P("input", "T", ""), P("router_probs", "T", ""),
                                                     P("fc1_experts_weights", "T", ""), optional("fc1_experts_bias"),
                                                     P("fc2_experts_weights", "T", ""), optional("fc2_experts_bias"),
                                                     optional("fc3_experts_weights"), optional("fc3_experts_bias")],
                       outputs=[P("output", "T", "")], type_constraints=T,
                       attributes=[A("k", INT, ""), A("activation_type", STR, ""),
                                   A("normalize_routing_weights", INT, ""), A("swiglu_fusion", INT, ""),
                                   A("activation_alpha", FLT, ""), A("activation_beta", FLT, "")]), same_as_input),
        (defs.OpSchema("GroupQueryAttention", MS_DOMAIN, 1,
                       inputs=[P("query", "T", ""), optional("key"), optional("value"), optional("past_key"),
                               optional("past_value"), P("seqlens_k", "M", ""), P("total_sequence_length", "M", "")],
                       outputs=[P("output", "T", ""), P("present_key", "T", ""), P("present_value", "T", "")],
                       type_constraints=T + [("M", ["tensor(int32)"], "")],
                       attributes=[A("num_heads", INT, ""), A("kv_num_heads", INT, "")]), gqa_infer),
        (defs.OpSchema("CausalConvWithState", MS_DOMAIN, 1,
                       inputs=[P("input", "T", ""), P("weight", "T", ""), optional("bias"), optional("past_state")],
                       outputs=[P("output", "T", ""), P("present_state", "T", "")], type_constraints=T,
                       attributes=[A("activation", STR, ""), A("ndim", INT, "")]), conv_infer),
    ]
    for schema, infer in schemas:
        try:
            defs.get_schema(schema.name, 1, MS_DOMAIN)
            continue
        except defs.SchemaError:
            pass
        schema.set_type_and_shape_inference_function(infer)
        defs.register_schema(schema)


@functools.cache
def _ms():
    import onnxscript

    register_schemas()
    return onnxscript.values.Opset(MS_DOMAIN, 1)


# --------------------------------------------------------------------------- torch side: one op per ORT node
@torch.library.custom_op("mambadeploy::ort_moe", mutates_args=())
def ort_moe(x: torch.Tensor, router_logits: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, router: int,
            top_k: int, activation: str) -> torch.Tensor:
    weights, experts = ref_ops.route_ref(router_logits, _ROUTER_NAMES[router], top_k)
    return ref_ops.expert_gather_ref(x, w1, w2, experts, weights, activation)


@ort_moe.register_fake
def _ort_moe_fake(x, router_logits, w1, w2, router, top_k, activation):
    return torch.empty_like(x)


def _moe_forward(self, x):
    """layers.MoE.forward through one ort_moe node (same math as the reference)."""
    shape = x.shape
    x2d = x.reshape(-1, shape[-1])
    y = torch.ops.mambadeploy.ort_moe(x2d, self.router(x2d), self.w1, self.w2, _ROUTERS[self.router_kind],
                                      self.top_k, self.activation)
    return y.reshape(shape)


@torch.library.custom_op("mambadeploy::ort_gqa_decode", mutates_args=())
def ort_gqa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor,
                   value_cache: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, H, hd); k, v (B, KV, hd); caches (B, KV, max_len, hd); pos (B,) int64. The new K/V written at slot pos,
    then attention over slots [0, pos]: (out (B, H, hd), key_cache, value_cache) — Attention.step's math."""
    from ..kernels.decode_attention import decode_attention_ref

    rows = torch.arange(q.shape[0])
    key_cache, value_cache = key_cache.clone(), value_cache.clone()
    key_cache[rows, :, pos] = k.to(key_cache.dtype)
    value_cache[rows, :, pos] = v.to(value_cache.dtype)
    return decode_attention_ref(q, key_cache, value_cache, pos + 1), key_cache, value_cache


@ort_gqa_decode.register_fake
def _ort_gqa_decode_fake(q, k, v, key_cache, value_cache, pos):
    return torch.empty_like(q), torch.empty_like(key_cache), torch.empty_like(value_cache)


def _gqa_decode_via_op(q, k, v, key_cache, value_cache, pos):
    return torch.ops.mambadeploy.ort_gqa_decode(q, k, v, key_cache, value_cache, pos)


_attention_step = attention_step_via(_gqa_decode_via_op)  # layers.Attention.step through one ort_gqa_decode node


def _conv_step_via_sequence_op(x, conv_state, weight, bias=None, activation=None):
    """A decode conv step is the sequence conv over one column with the state as its left context."""
    y, state = torch.ops.mambadeploy.causal_conv1d(x.unsqueeze(-1), weight, bias, conv_state,
                                                   {None: 0, "silu": 1}[activation])
    return y.squeeze(-1), state


def contrib_patches(config: ModelConfig, graph: str):
    """Patches for tracing a graph in contrib mode: MoE layers (when they fit) and, for decode, the conv step."""
    import contextlib

    stack = contextlib.ExitStack()
    if moe_fits(config):
        stack.enter_context(patched(layers.MoE, forward=_moe_forward))
    if graph == "decode":
        stack.enter_context(patched(ref_ops, causal_conv1d_update_ref=_conv_step_via_sequence_op))
        if gqa_fits(config):
            stack.enter_context(patched(layers.Attention, step=_attention_step))
    return stack


# --------------------------------------------------------------------------- emitters
def emit_causal_conv(x, weight, bias, initial_state, activation: int):
    """CausalConv1d as com.microsoft.CausalConvWithState; the (b, d, K) state = last K of [initial or zeros, x]."""
    from onnxscript import opset18 as op

    K = weight.shape[1]
    past = None if initial_state is None else op.Slice(initial_state, [1], [K], [2])
    xf = op.Cast(x, to=1)
    y, _ = _ms().CausalConvWithState(xf, op.Unsqueeze(op.Cast(weight, to=1), [1]),
                                     None if bias is None else op.Cast(bias, to=1), past,
                                     activation="silu" if activation else "none", ndim=1, _outputs=2)
    if initial_state is None:
        zeros_shape = op.Concat(op.Shape(x, start=0, end=2), op.Constant(value_ints=[K]), axis=0)
        initial_state = op.ConstantOfShape(zeros_shape)
    tail = op.Slice(xf, [-K], [2 ** 62], [2])  # at most K columns: the state never needs more
    state = op.Slice(op.Concat(initial_state, tail, axis=2), [-K], [2 ** 62], [2])
    return op.CastLike(y, x), state


def emit_moe(x, router_logits, w1, w2, router: int, top_k: int, activation: str):
    from onnxscript import opset18 as op

    E, F2, d = w1.shape
    interleaved = op.Reshape(op.Transpose(op.Reshape(w1, op.Constant(value_ints=[E, 2, F2 // 2, d])),
                                          perm=[0, 2, 1, 3]), op.Constant(value_ints=[E, F2, d]))
    sigmoid = _ROUTER_NAMES[router] == "sigmoid_top1"
    y = _ms().MoE(x, op.CastLike(router_logits, x), interleaved, None, w2, k=1 if sigmoid else int(top_k),
                  activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                  normalize_routing_weights=1 if sigmoid else 0)
    if sigmoid:  # weight 1 on the argmax expert, then the reference's sigmoid(max logit) in fp32
        scale = op.Sigmoid(op.ReduceMax(op.Cast(router_logits, to=1), [-1], keepdims=1))
        y = op.CastLike(op.Mul(op.Cast(y, to=1), scale), x)
    return y


def emit_gqa_decode(q, k, v, key_cache, value_cache, pos):
    """ort_gqa_decode as com.microsoft.GroupQueryAttention over the fixed-length cache (see the module docstring)."""
    from onnxscript import opset18 as op

    heads, kv_heads = q.shape[1], key_cache.shape[1]
    flat = op.Constant(value_ints=[0, 1, -1])  # (B, n, hd) -> (B, 1, n * hd): one new token per row
    total = op.Cast(op.Add(op.ReduceMax(pos, keepdims=0), op.Constant(value_int=1)), to=6)
    out, key_cache, value_cache = _ms().GroupQueryAttention(
        op.Reshape(q, flat), op.Reshape(k, flat), op.Reshape(v, flat), key_cache, value_cache, op.Cast(pos, to=6),
        total, num_heads=int(heads), kv_num_heads=int(kv_heads), _outputs=3)
    return op.Reshape(out, op.Shape(q)), key_cache, value_cache


def translation_table() -> dict:
    return {torch.ops.mambadeploy.causal_conv1d.default: emit_causal_conv,
            torch.ops.mambadeploy.ort_moe.default: emit_moe,
            torch.ops.mambadeploy.ort_gqa_decode.default: emit_gqa_decode}
