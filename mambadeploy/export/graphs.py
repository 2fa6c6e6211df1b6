"""Trace the reference model's own prefill and decode into ONNX with torch.onnx.export(dynamo=True).

Why the dynamo exporter: it traces with fake tensors (no compute, no weight copies: initializers stay views of the
parameters until they are written), takes `dynamic_shapes` for batch and length, and lets a torch custom op become one
ONNX node through `custom_translation_table` (the registry ops) — the legacy TorchScript exporter would unroll the scan's
Python loop at the dummy length. The patches that steer the trace are context managers that restore the originals.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch

from ..models.model import MambaMoELM
from ..models.state import PAST, PRESENT, state_specs
from . import onnx_ops, torch_ops
from .descriptions import ExportDescription


class PrefillGraph(torch.nn.Module):
    """(input_ids (B, L), lengths (B,)) -> (logits of the last position (B, V), *present states)."""

    def __init__(self, model: MambaMoELM):
        super().__init__()
        self.model = model
        self.names = [s.name for s in state_specs(model.config, model.dtype)]

    def forward(self, input_ids, lengths):
        logits, state = self.model.forward(input_ids, lengths, check=False)
        return (logits, *(state[n] for n in self.names))


class PrefillStateGraph(torch.nn.Module):
    """(input_ids (B, L), lengths (B,), *past states) -> (logits of the last position (B, V), *present states): a
    prompt chunk continuing the sequences in `past` (model.forward(state=...)); chunked prefill runs it once per chunk
    from an all-zero state, lengths = each row's real tokens in the chunk (0 allowed)."""

    def __init__(self, model: MambaMoELM):
        super().__init__()
        self.model = model
        self.names = [s.name for s in state_specs(model.config, model.dtype)]

    def forward(self, input_ids, lengths, *past):
        logits, state = self.model.forward(input_ids, lengths, check=False, state=OrderedDict(zip(self.names, past)))
        return (logits, *(state[n] for n in self.names))


class DecodeGraph(torch.nn.Module):
    """(input_ids (B, 1), *past states) -> (logits (B, V), *present states)."""

    def __init__(self, model: MambaMoELM):
        super().__init__()
        self.model = model
        self.names = [s.name for s in state_specs(model.config, model.dtype)]

    def forward(self, input_ids, *past):
        logits, state = self.model.step(input_ids, OrderedDict(zip(self.names, past)), check=False)
        return (logits, *(state[n] for n in self.names))


def last_position_head(model: MambaMoELM):
    """Prefill only needs the last position's logits: run the head on h[:, -1] instead of every position (left padding
    puts every row's last real token there)."""
    head = model._head
    return torch_ops.patched(model, _head=lambda h: head(h[:, -1]))


def io_names(model: MambaMoELM, graph: str) -> tuple[list[str], list[str]]:
    names = [s.name for s in state_specs(model.config, model.dtype)]
    inputs = {"prefill": ["input_ids", "lengths"], "decode": ["input_ids"] + [PAST + n for n in names],
              "prefill_state": ["input_ids", "lengths"] + [PAST + n for n in names]}[graph]
    return inputs, ["logits"] + [PRESENT + n for n in names]


def trace(model: MambaMoELM, graph: str, ops: str, opset_version: int, desc: ExportDescription,
          max_length: int | None):
    """Return the ONNXProgram of one graph; its `mambadeploy` nodes are expanded later for portable/contrib modes."""
    from . import contrib, gqa_prefill

    onnx_ops.register_schemas()
    specs = state_specs(model.config, model.dtype)
    B, L = desc.dummy_batch, desc.dummy_length
    batch = torch.export.Dim("batch", min=1, max=desc.max_batch)
    table = onnx_ops.translation_table()
    with contextlib.ExitStack() as patches:
        if graph == "decode":  # first, so that contrib's own patches of the same functions win
            patches.enter_context(torch_ops.decode_patches())
            if ops == "custom":
                patches.enter_context(torch_ops.attention_patches())
                patches.enter_context(torch_ops.sparse_linear_patches())
        if ops == "contrib":
            contrib.register_schemas()
            table.update(contrib.translation_table())
            patches.enter_context(contrib.contrib_patches(model.config, graph))
        if graph in ("prefill", "prefill_state"):
            length = torch.export.Dim("length", min=1, max=max_length or 1 << 24)
            patches.enter_context(torch_ops.custom_op_patches())
            patches.enter_context(last_position_head(model))
            wrapper = PrefillGraph(model) if graph == "prefill" else PrefillStateGraph(model)
            lengths = desc.dummy_lengths
            if graph == "prefill_state" and gqa_prefill.uses_gqa_prefill(model.config, ops):
                # GroupQueryAttention continues a cache at batch 1 only: a static batch of 1 (see gqa_prefill)
                patches.enter_context(gqa_prefill.gqa_prefill_patches())
                table.update(gqa_prefill.translation_table())
                B, batch, lengths = 1, None, (L,)
            args = (torch.zeros(B, L, dtype=torch.int64), torch.tensor(lengths, dtype=torch.int64))
            rows = {0: batch} if batch is not None else {}
            dynamic = ({**rows, 1: length}, rows)
            if graph == "prefill_state":
                args += tuple(torch.zeros(s.concrete_shape(B), dtype=s.dtype) for s in specs)
                dynamic += (tuple(rows for _ in specs),)  # *past: one entry holding every state's shapes
        else:
            wrapper = DecodeGraph(model)
            args = (torch.zeros(B, 1, dtype=torch.int64),
                    *(torch.zeros(s.concrete_shape(B), dtype=s.dtype) for s in specs))
            dynamic = ({0: batch}, tuple({0: batch} for _ in specs))
        input_names, output_names = io_names(model, graph)
        with torch.no_grad():
            program = torch.onnx.export(
                wrapper.eval(), args, dynamo=True, dynamic_shapes=dynamic, custom_translation_table=table,
                opset_version=opset_version, input_names=input_names, output_names=output_names, verbose=False,
                optimize=False,
            )
    light_optimize(program.model)
    return program


def light_optimize(model, weight_elements: int = 8192) -> None:
    """Constant folding and clean-up, without the exporter's default optimizer: its pattern rewriter took ~20 s per
    36-layer graph (most of the export time of a full-size model), and it folded Transpose(weight) into transposed
    copies of the weights (memory, and prefill/decode could no longer share them). ONNX Runtime applies its own graph
    optimizations when it loads the graph. Nodes reading a weight-sized constant are never folded."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript.optimizer import fold_constants

    def should_fold(node):
        big = any(v is not None and v.const_value is not None and v.const_value.size > weight_elements
                  for v in node.inputs)
        return False if big else None

    fold_constants(model, should_fold=should_fold)
    ir.passes.Sequential(
        common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.CommonSubexpressionEliminationPass(), common.IdentityEliminationPass(), common.OutputFixPass(),
        common.NameFixPass(),
    )(model)
