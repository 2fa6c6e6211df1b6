"""The custom-op registry: one entry per op, the join key for every piece that implements it.

An entry ties together: the op's ONNX identity (domain `mambadeploy`, op type, version), its inputs/outputs and
attributes, the symbolic shape of every input and output (op_shapes.py derives the shape rule, the shape checks of
the C++ kernels and TensorRT's zero defaults from it), the dtype rule, the pure-PyTorch reference, and — as lazily
resolved "module:attr" paths, so this module imports nothing above its floor — the Triton kernel, the ONNX node
emitter and its portable (standard-op) expansion, the ORT kernel name and the TensorRT plugin. Export, plugins,
kernels and tests all look ops up here; nothing else hard-codes an op name. Registering a name twice fails at import.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from . import op_shapes
from .errors import MambaDeployError

DOMAIN = "mambadeploy"
OPSET_VERSION = 1

# Activation codes carried as int attributes (TensorRT plugin fields and ORT attributes stay numeric).
ACTIVATION_CODES = {"gelu": 0, "silu": 1, "gelu_tanh": 2}

# Input type classes: "T" = the op's activation dtype (every "T" input of one node has the same one), "float" = any float
# dtype on its own (parameters), "float32" = fp32 only (recurrent states), "index" = int32 or int64.
INPUT_TYPE_CLASSES = {
    "T": ("float32", "float16", "bfloat16"),
    "float": ("float32", "float16", "bfloat16"),
    "float32": ("float32",),
    "index": ("int32", "int64"),
}


@dataclass(frozen=True)
class OpEntry:
    name: str  # ONNX op_type == TensorRT plugin name
    version: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attributes: dict  # name -> (type, default)
    # input / output name -> its symbolic shape, a tuple of dims ("b", "2F", "*rows": see op_shapes.py); every input
    # then every output, in order. The one statement of the op's shapes: the output shape rule, the shape checks of the
    # ORT kernels (opset_generated.h) and the zeros TensorRT preparation puts in for an omitted input follow from it.
    shapes: dict
    reference: str  # "module:function" of the torch reference (fp32 math)
    # The dtype an exported node carries at each input: "T" (the model dtype), "F32" or "I64". The ORT kernels'
    # signatures (opset_generated.h) and the output dtypes follow from it.
    node_dtypes: dict
    output_dtypes: tuple  # per output: "T" (the dtype of the first "T" input) or "F32"
    torch_op: str  # the torch custom op torch.ops.mambadeploy.<torch_op> (export/torch_ops.py) that exports to this node
    doc: str = ""
    links: dict = field(default_factory=dict)  # piece -> "module:attr" (triton, onnx_emitter, portable, ort, trt)
    # input name -> type class (see INPUT_TYPE_CLASSES); the TensorRT plugins' format checks and the ORT kernels use it
    input_types: dict = field(default_factory=dict)
    optional_inputs: tuple = ()  # inputs a node may leave empty (""): the reference's None defaults
    # optional inputs whose absence zeros cannot stand for (the gate z: absent = no gate, zeros = y * silu(0) = 0);
    # every other optional input reads as zeros when absent, which is how TensorRT preparation fills it in
    absence_not_zeros: tuple = ()
    # runtime -> the @triton.jit kernels ("module:attr") its ahead-of-time path compiles for this op: "trt" (the
    # TensorRT plugin, through its `trt_adapter` link) and "ort_cuda" (the ORT CUDA library's AOT table). A test reads
    # the adapters and checks these are the kernels they really call.
    kernels: dict = field(default_factory=dict)

    def __post_init__(self):
        if set(self.node_dtypes) != set(self.inputs) or list(self.node_dtypes) != list(self.inputs):
            raise MambaDeployError(f"op {self.name}: node_dtypes must name every input, in order")
        for name, cls in self.node_dtypes.items():
            allowed = {"T": ("T",), "float": ("T", "F32"), "float32": ("F32",), "index": ("I64",)}
            if cls not in allowed[self.input_types.get(name, "T")]:
                raise MambaDeployError(f"op {self.name}: input {name} is {cls} in the node but "
                                       f"{self.input_types.get(name)} in input_types")
        if len(self.output_dtypes) != len(self.outputs) or not set(self.output_dtypes) <= {"T", "F32"}:
            raise MambaDeployError(f"op {self.name}: output_dtypes must give T or F32 per output")
        op_shapes.check_declaration(self.name, self.shapes, self.inputs, self.outputs, self.optional_inputs)
        if not set(self.absence_not_zeros) <= set(self.optional_inputs):
            raise MambaDeployError(f"op {self.name}: absence_not_zeros must name optional inputs")

    def shape_rule(self, input_shapes, attrs=None) -> tuple:
        """Output shapes from input shapes (ints, names or TensorRT dim expressions): picked as `shapes` states."""
        return op_shapes.output_rule(self.shapes, self.inputs, self.outputs, self.optional_inputs)(input_shapes, attrs)

    def resolve_shapes(self, input_shapes) -> dict:
        """{dim name: size} from concrete input shapes (None for an absent optional input); raises on a mismatch."""
        return op_shapes.resolve(self.name, self.shapes, self.inputs, list(input_shapes))

    def dim_names(self) -> tuple:
        """The dim names the inputs carry, in order of first appearance."""
        return op_shapes.dim_names(self.shapes, self.inputs)

    def zero_fill(self, name: str) -> list | None:
        """[(input, start, end)] slices whose concatenated dims shape zeros for the omitted optional input `name`;
        None where zeros cannot stand for its absence."""
        if name not in self.optional_inputs or name in self.absence_not_zeros:
            return None
        return op_shapes.zero_fill_recipe(self.shapes, self.inputs, self.optional_inputs, name)

    def dtype_rule(self, dtypes, attrs=None) -> tuple:
        """Output dtypes from input dtypes: "T" outputs take the first "T" input's dtype, "F32" ones are float32."""
        first_t = dtypes[list(self.node_dtypes.values()).index("T")]
        return tuple(first_t if c == "T" else "float32" for c in self.output_dtypes)

    @property
    def qualified_name(self) -> str:
        return f"{DOMAIN}::{self.name}"

    def resolve(self, piece: str):
        """Import one linked piece ('reference', 'triton', 'onnx_emitter', 'portable', 'ort', 'trt', ...)."""
        path = self.reference if piece == "reference" else self.links.get(piece)
        return self._import(path, piece)

    def resolve_kernels(self, runtime: str) -> tuple:
        """The @triton.jit kernels the runtime's AOT path compiles for this op ('trt', 'ort_cuda')."""
        return tuple(self._import(p, f"{runtime} kernel") for p in self.kernels.get(runtime, ()))

    def _import(self, path, piece):
        if path is None:
            raise MambaDeployError(f"op {self.qualified_name} has no {piece!r} implementation registered")
        module, _, attr = path.partition(":")
        return getattr(importlib.import_module(module), attr)

    def check_attributes(self, attrs: dict) -> dict:
        unknown = set(attrs) - set(self.attributes)
        if unknown:
            raise MambaDeployError(f"op {self.qualified_name}: unknown attributes {sorted(unknown)}")
        return {k: attrs.get(k, default) for k, (_, default) in self.attributes.items()}


REGISTRY: dict[str, OpEntry] = {}


def register(entry: OpEntry) -> OpEntry:
    if entry.name in REGISTRY:
        raise MambaDeployError(f"op {entry.qualified_name} registered twice")
    REGISTRY[entry.name] = entry
    return entry


def get_op(name: str, version: int | None = None) -> OpEntry:
    if name not in REGISTRY:
        raise MambaDeployError(f"unknown op {DOMAIN}::{name}; known: {', '.join(sorted(REGISTRY))}")
    entry = REGISTRY[name]
    if version is not None and version != entry.version:
        raise MambaDeployError(
            f"op {entry.qualified_name} version {version} is not supported (this mambadeploy implements version "
            f"{entry.version}); re-export the model with this mambadeploy version"
        )
    return entry


def link(name: str, piece: str, path: str) -> None:
    """Attach an implementation path to an op (used by the lower-floor modules' registration lines below)."""
    get_op(name).links[piece] = path


# --------------------------------------------------------------------------- the ops
register(OpEntry(
    name="SelectiveScan", version=1,
    torch_op="selective_scan",
    node_dtypes={"u": "T", "delta": "T", "A": "F32", "B": "T", "C": "T", "D": "T", "z": "T", "delta_bias": "T",
                 "initial_state": "F32"},
    output_dtypes=("T", "F32"),
    inputs=("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"),
    outputs=("y", "last_state"),
    attributes={"delta_softplus": ("int", 1)},
    shapes={"u": ("b", "d", "L"), "delta": ("b", "d", "L"), "A": ("d", "N"), "B": ("b", "N", "L"),
            "C": ("b", "N", "L"), "D": ("d",), "z": ("b", "d", "L"), "delta_bias": ("d",),
            "initial_state": ("b", "d", "N"), "y": ("b", "d", "L"), "last_state": ("b", "d", "N")},
    optional_inputs=("D", "z", "delta_bias", "initial_state"),
    absence_not_zeros=("z",),
    reference="mambadeploy.models.ref_ops:selective_scan_ref",
    input_types={"u": "T", "delta": "T", "A": "float", "B": "T", "C": "T", "D": "float", "z": "T",
                 "delta_bias": "float", "initial_state": "float32"},
    doc="Mamba-1 selective scan over a sequence; softplus(delta + delta_bias), D skip, silu(z) gate, fp32 state.",
))

register(OpEntry(
    name="CausalConv1d", version=1,
    torch_op="causal_conv1d",
    node_dtypes={"x": "T", "weight": "T", "bias": "T", "initial_state": "F32"},
    output_dtypes=("T", "F32"),
    inputs=("x", "weight", "bias", "initial_state"),
    outputs=("y", "final_state"),
    attributes={"activation": ("int", 1)},  # 1 = SiLU, 0 = none
    shapes={"x": ("b", "d", "L"), "weight": ("d", "K"), "bias": ("d",), "initial_state": ("b", "d", "K"),
            "y": ("b", "d", "L"), "final_state": ("b", "d", "K")},
    optional_inputs=("bias", "initial_state"),
    reference="mambadeploy.models.ref_ops:causal_conv1d_ref",
    input_types={"x": "T", "weight": "float", "bias": "float", "initial_state": "float32"},
    doc="Causal depthwise conv over time with a (b, d, K) state of the last K inputs, optional fused SiLU.",
))

register(OpEntry(
    name="TopKExpertGather", version=1,
    torch_op="expert_gather",
    node_dtypes={"x": "T", "w1": "T", "w2": "T", "experts": "I64", "weights": "F32"},
    output_dtypes=("T",),
    inputs=("x", "w1", "w2", "experts", "weights"),
    outputs=("y",),
    attributes={"activation": ("int", ACTIVATION_CODES["gelu"]), "top_k": ("int", 1)},
    shapes={"x": ("T", "d"), "w1": ("E", "2F", "d"), "w2": ("E", "d", "F"), "experts": ("T", "k"),
            "weights": ("T", "k"), "y": ("T", "d")},
    reference="mambadeploy.models.ref_ops:expert_gather_ref",
    input_types={"x": "T", "w1": "float", "w2": "float", "experts": "index", "weights": "float"},
    doc="Gated-MLP MoE over stacked expert weights w1 (E, 2F, d) = [gate; up], w2 (E, d, F); sum of k weighted experts.",
))


# --------------------------------------------------------------------------- the decode step's ops (one token per row)
# Router kinds carried as an int attribute of RoutedMoE (the model config's names).
ROUTER_CODES = {"sigmoid_top1": 0, "softmax_topk": 1}

register(OpEntry(
    name="CausalConv1dUpdate", version=1,
    torch_op="conv_update",
    node_dtypes={"x": "T", "conv_state": "F32", "weight": "T", "bias": "T"},
    output_dtypes=("T", "F32"),
    inputs=("x", "conv_state", "weight", "bias"),
    outputs=("y", "new_state"),
    attributes={"activation": ("int", 1)},  # 1 = SiLU, 0 = none
    shapes={"x": ("b", "d"), "conv_state": ("b", "d", "K"), "weight": ("d", "K"), "bias": ("d",),
            "y": ("b", "d"), "new_state": ("b", "d", "K")},
    optional_inputs=("bias",),
    reference="mambadeploy.models.ref_ops:causal_conv1d_update_ref",
    input_types={"x": "T", "conv_state": "float32", "weight": "float", "bias": "float"},
    doc="One decode step of the causal depthwise conv: shift the (b, d, K) state by the new input, dot with the "
        "weight, bias, optional SiLU.",
))

register(OpEntry(
    name="SelectiveStateUpdate", version=1,
    torch_op="state_update",
    node_dtypes={"state": "F32", "x": "T", "dt": "T", "A": "F32", "B": "T", "C": "T", "D": "T", "z": "T",
                 "dt_bias": "T"},
    output_dtypes=("T", "F32"),
    inputs=("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias"),
    outputs=("y", "new_state"),
    attributes={"dt_softplus": ("int", 1)},
    shapes={"state": ("b", "d", "N"), "x": ("b", "d"), "dt": ("b", "d"), "A": ("d", "N"), "B": ("b", "N"),
            "C": ("b", "N"), "D": ("d",), "z": ("b", "d"), "dt_bias": ("d",), "y": ("b", "d"),
            "new_state": ("b", "d", "N")},
    optional_inputs=("D", "z", "dt_bias"),
    absence_not_zeros=("z",),
    reference="mambadeploy.models.ref_ops:selective_state_update_ref",
    input_types={"state": "float32", "x": "T", "dt": "T", "A": "float", "B": "T", "C": "T", "D": "float", "z": "T",
                 "dt_bias": "float"},
    doc="One decode step of the Mamba-1 recurrence: softplus(dt + dt_bias), h = exp(dt*A) h + dt*B*x, "
        "y = <h, C> + D*x, y *= silu(z); fp32 state.",
))

register(OpEntry(
    name="AddRMSNorm", version=1,
    torch_op="add_rms_norm",
    node_dtypes={"x": "T", "residual": "F32", "weight": "T"},
    output_dtypes=("T", "F32"),
    inputs=("x", "residual", "weight"),
    outputs=("y", "residual_out"),
    attributes={"epsilon": ("float", 1e-5)},
    # x in T, residual fp32 -> y in T, residual_out fp32 (any leading dims: rows of d)
    shapes={"x": ("*rows", "d"), "residual": ("*rows", "d"), "weight": ("d",), "y": ("*rows", "d"),
            "residual_out": ("*rows", "d")},
    reference="mambadeploy.models.ref_ops:add_rms_norm_ref",
    input_types={"x": "T", "residual": "float32", "weight": "float"},
    doc="Residual add in fp32 (residual + x) then RMSNorm of the sum: returns (the norm in x's dtype, the sum).",
))

register(OpEntry(
    name="RoutedMoE", version=1,
    torch_op="routed_moe",
    node_dtypes={"x": "T", "router_weight": "T", "router_bias": "T", "w1": "T", "w2": "T"},
    output_dtypes=("T",),
    inputs=("x", "router_weight", "router_bias", "w1", "w2"),
    outputs=("y",),
    attributes={"router": ("int", ROUTER_CODES["sigmoid_top1"]), "top_k": ("int", 1),
                "activation": ("int", ACTIVATION_CODES["gelu"])},
    shapes={"x": ("T", "d"), "router_weight": ("E", "d"), "router_bias": ("E",), "w1": ("E", "2F", "d"),
            "w2": ("E", "d", "F"), "y": ("T", "d")},
    optional_inputs=("router_bias",),
    reference="mambadeploy.models.ref_ops:routed_moe_ref",
    input_types={"x": "T", "router_weight": "float", "router_bias": "float", "w1": "float", "w2": "float"},
    doc="A whole MoE layer for few tokens: router logits (in x's dtype), sigmoid top-1 or softmax top-k, then only "
        "the chosen experts' weight rows are read, in place (no gathered copy).",
))


# --------------------------------------------------------------------------- links: export (ONNX emitter, portable expansion)
for _name, _emit, _portable in (("SelectiveScan", "emit_selective_scan", "expand_selective_scan"),
                                ("CausalConv1d", "emit_causal_conv1d", "expand_causal_conv1d"),
                                ("TopKExpertGather", "emit_expert_gather", "expand_expert_gather")):
    link(_name, "onnx_emitter", f"mambadeploy.export.onnx_ops:{_emit}")
    link(_name, "portable", f"mambadeploy.export.portable:{_portable}")
for _name, _emit, _portable in (("CausalConv1dUpdate", "emit_conv_update", "expand_conv_update"),
                                ("SelectiveStateUpdate", "emit_state_update", "expand_state_update"),
                                ("AddRMSNorm", "emit_add_rms_norm", "expand_add_rms_norm"),
                                ("RoutedMoE", "emit_routed_moe", "expand_routed_moe")):
    link(_name, "onnx_emitter", f"mambadeploy.export.onnx_ops:{_emit}")
    link(_name, "portable", f"mambadeploy.export.portable_decode:{_portable}")

# opset-27 standard ops (--ops standard): LinearAttention / CausalConvWithState; the other ops take their portable form
for _name, _std in (("SelectiveScan", "expand_scan_standard"), ("SelectiveStateUpdate", "expand_state_update_standard"),
                    ("CausalConv1d", "expand_conv_standard"), ("CausalConv1dUpdate", "expand_conv_update_standard")):
    link(_name, "standard", f"mambadeploy.export.standard:{_std}")

# --------------------------------------------------------------------------- links: plugins (ORT library, TensorRT plugin)
for _name in REGISTRY:
    link(_name, "ort", "mambadeploy.plugins.ort.build:register")  # one library holds every op's CPU and CUDA kernels
    link(_name, "trt", "mambadeploy.plugins.trt_v3:plugin_classes")  # IPluginV3 (TensorRT-RTX and TensorRT 10)
for _name in ("SelectiveScan", "CausalConv1d", "TopKExpertGather"):  # the decode ops have no tensorrt.plugin form yet
    link(_name, "trt_qdp", "mambadeploy.plugins.trt_qdp:register_qdp")  # tensorrt.plugin + aot_impl (full TensorRT)

# --------------------------------------------------------------------------- links: Triton kernels (kernels/, same signature as the reference)
link("SelectiveScan", "triton", "mambadeploy.kernels.selective_scan:selective_scan")
link("CausalConv1d", "triton", "mambadeploy.kernels.causal_conv1d:causal_conv1d")
link("TopKExpertGather", "triton", "mambadeploy.kernels.moe_experts:expert_gather")
link("CausalConv1dUpdate", "triton", "mambadeploy.kernels.causal_conv1d:causal_conv1d_update")
link("SelectiveStateUpdate", "triton", "mambadeploy.kernels.selective_state_update:selective_state_update")
link("AddRMSNorm", "triton", "mambadeploy.kernels.rms_norm:add_rms_norm")

# --------------------------------------------------------------------------- kernels: what each runtime's AOT path compiles
# The TensorRT plugin compiles its `trt_adapter` (a thin @triton.jit wrapper in plugins/aot_kernels.py) and the ORT CUDA
# library compiles the adapters of plugins/ort/triton_adapters.py; `kernels[runtime]` names the kernel bodies they run
# (a kernel of mambadeploy/kernels/, or the adapter itself where it has its own body). SelectiveScan's TensorRT plugin
# runs the single-launch scan (one program per channel block walks the whole sequence; a TensorRT AOT plugin gets no
# workspace), not the segment-parallel kernels that torch-fast's `triton` launcher and the ORT CUDA library run. The
# decode ops have no ORT AOT kernels: the ORT CUDA library runs its hand-written CUDA kernels for them.
_K, _TRT, _ORT = "mambadeploy.kernels.", "mambadeploy.plugins.aot_kernels:", "mambadeploy.plugins.ort.triton_adapters:"
_MOE_ORT = (_K + "moe_routing:moe_align_kernel", _K + "moe_experts:moe_gemm_fc1_kernel",
            _K + "moe_experts:moe_gemm_fc2_kernel", _ORT + "moe_sum_ort")
for _name, _adapter, _trt, _ort in (
        ("SelectiveScan", "selective_scan_trt", (_K + "selective_scan:selective_scan_kernel",),
         (_K + "selective_scan:selective_scan_seg_kernel", _K + "selective_scan:selective_scan_fold_kernel")),
        ("CausalConv1d", "causal_conv1d_trt", (_K + "causal_conv1d:causal_conv1d_kernel",),
         (_K + "causal_conv1d:causal_conv1d_kernel",)),
        ("TopKExpertGather", "expert_gather_trt", (_TRT + "expert_gather_trt",), _MOE_ORT),
        ("CausalConv1dUpdate", "conv_update_trt", (_K + "causal_conv1d:causal_conv1d_update_kernel",), ()),
        ("SelectiveStateUpdate", "state_update_trt", (_K + "selective_state_update:selective_state_update_kernel",), ()),
        ("AddRMSNorm", "add_rms_norm_trt", (_K + "rms_norm:add_rms_norm_kernel",), ()),
        ("RoutedMoE", "routed_moe_trt", (_TRT + "routed_moe_trt",), _MOE_ORT)):
    link(_name, "trt_adapter", _TRT + _adapter)
    get_op(_name).kernels.update({"trt": _trt, "ort_cuda": _ort})


# --------------------------------------------------------------------------- DecodeAttention (issue 21: the KV cache at scale)
# Its present_* outputs ALIAS its past caches: the runtimes bind them to the same buffer (OrtRunner; the TensorRT
# plugin declares it with get_aliased_input), so a step writes one slot and reads [0, pos], never the whole cache.
OUTPUT_ALIASES = {"DecodeAttention": {"present_key": "key_cache", "present_value": "value_cache"}}

register(OpEntry(
    name="DecodeAttention", version=1,
    torch_op="decode_attention",
    node_dtypes={"q": "T", "k": "T", "v": "T", "key_cache": "T", "value_cache": "T", "pos": "I64"},
    output_dtypes=("T", "T", "T"),
    inputs=("q", "k", "v", "key_cache", "value_cache", "pos"),
    outputs=("out", "present_key", "present_value"),
    attributes={"scale": ("float", 0.0)},  # 0 = 1/sqrt(head_dim)
    # q (B, H, hd), k/v (B, KV, hd), caches (B, KV, S, hd), pos (B,) -> out (B, H, hd), present caches like the past
    shapes={"q": ("B", "H", "hd"), "k": ("B", "KV", "hd"), "v": ("B", "KV", "hd"), "key_cache": ("B", "KV", "S", "hd"),
            "value_cache": ("B", "KV", "S", "hd"), "pos": ("B",), "out": ("B", "H", "hd"),
            "present_key": ("B", "KV", "S", "hd"), "present_value": ("B", "KV", "S", "hd")},
    reference="mambadeploy.kernels.decode_attention:decode_attention_update_ref",
    input_types={"q": "T", "k": "T", "v": "T", "key_cache": "T", "value_cache": "T", "pos": "index"},
    doc="One decode step of GQA attention over a preallocated KV cache: write k/v at slot pos[b], then attend slots "
        "[0, pos[b]] (H // KV consecutive query heads per KV head); present_* alias the caches.",
))
link("DecodeAttention", "onnx_emitter", "mambadeploy.export.onnx_ops:emit_decode_attention")
link("DecodeAttention", "portable", "mambadeploy.export.portable_decode:expand_decode_attention")
link("DecodeAttention", "ort", "mambadeploy.plugins.ort.build:register")
link("DecodeAttention", "trt", "mambadeploy.plugins.trt_v3:plugin_classes")
link("DecodeAttention", "triton", "mambadeploy.kernels.decode_attention:decode_attention_update")
link("DecodeAttention", "trt_adapter", _TRT + "decode_attention_split_trt")
# TensorRT (plugins/aot_attention.py) and ORT CUDA (aot_table.attention_specs) launch the same three: the slot write,
# then torch-fast's own split-K and combine kernels
_ATTENTION = (_TRT + "decode_attention_write_trt", _K + "decode_attention:decode_attention_split_kernel",
              _K + "decode_attention:decode_attention_combine_kernel")
get_op("DecodeAttention").kernels.update({"trt": _ATTENTION, "ort_cuda": _ATTENTION})


# --------------------------------------------------------------------------- SparseLinear (issue 18: SCAP in the decode graph)
# A calibrated model's sparsified linears (models/sparsity.py) in --ops custom decode graphs. The weight stays (N, K) as
# nn.Linear stores it: the same initializer as prefill's MatMul (the exporter never folds Transpose(weight) into a
# copy). The ORT kernels (CPU, and the library's hand-written CUDA kernel) and the TensorRT plugin's AOT adapter read
# only the weights of kept features; torch-fast's sparse_gemv_kernel wants a transposed (K, N) weight, so the adapter
# (plugins/aot_kernels.py sparse_linear_trt) has its own body.
register(OpEntry(
    name="SparseLinear", version=1,
    torch_op="sparse_linear",
    node_dtypes={"x": "T", "weight": "T", "bias": "T"},
    output_dtypes=("T",),
    inputs=("x", "weight", "bias"),
    outputs=("y",),
    attributes={"mode": ("float", 0.0), "threshold": ("float", 0.0)},
    # rows of x: the export flattens leading dims around the node (op_shapes' output rule copies a variadic dim only
    # whole, and y's last dim is N, not K)
    shapes={"x": ("rows", "K"), "weight": ("N", "K"), "bias": ("N",), "y": ("rows", "N")},
    optional_inputs=("bias",),
    reference="mambadeploy.kernels.sparse_gemv:sparse_linear_ref",
    input_types={"x": "T", "weight": "float", "bias": "float"},
    doc="SCAP sparse linear: y = s(x) W^T + b with s(x) = (x - mode) where |x - mode| > threshold else 0 (fp32 "
        "math, rounded to x's dtype); the mode's shift is folded into b already.",
))
link("SparseLinear", "onnx_emitter", "mambadeploy.export.onnx_ops:emit_sparse_linear")
link("SparseLinear", "portable", "mambadeploy.export.portable_decode:expand_sparse_linear")
link("SparseLinear", "ort", "mambadeploy.plugins.ort.build:register")  # ops_cpu_decode.cc, ops_cuda_decode.cc
link("SparseLinear", "trt", "mambadeploy.plugins.trt_v3:plugin_classes")
link("SparseLinear", "trt_adapter", _TRT + "sparse_linear_trt")  # its own body for the (N, K) weight
get_op("SparseLinear").kernels.update({"trt": (_TRT + "sparse_linear_trt",), "ort_cuda": ()})  # ORT CUDA: hand-written
link("SparseLinear", "triton", "mambadeploy.kernels.sparse_gemv:sparse_linear")
