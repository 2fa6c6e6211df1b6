"""The exporter: manifest and graph I/O per tiny preset, the op modes (custom nodes, ORT contrib ops checked numerically),
weights shared through external data, atomic writes, and the errors a user meets."""

import json
import os

import onnx
import pytest
import torch
from components import DEV_INSTALL, require_module

from mambadeploy import opset
from mambadeploy.errors import MambaDeployError
from mambadeploy.export import exporter
from mambadeploy.export.contrib import what_fits
from mambadeploy.export.manifest import Manifest
from mambadeploy.models.checkpoint import empty_model
from mambadeploy.models.config import LayerSpec, MambaConfig, ModelConfig, MoEConfig
from mambadeploy.models.model import init_random_
from mambadeploy.models.presets import blackmamba_config
from mambadeploy.models.state import PAST, PRESENT, state_specs
from mambadeploy.validate.tolerances import assert_logits_close

ort = require_module("onnxruntime", DEV_INSTALL)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """exported(preset, ops) -> export directory, made once per test session (the runtime's export cache)."""
    from mambadeploy.runtime.ort_runner import export_for

    old = os.environ.get("MAMBADEPLOY_CACHE")
    os.environ["MAMBADEPLOY_CACHE"] = str(tmp_path_factory.getbasetemp() / "mambadeploy-cache")
    yield lambda target, ops="portable": export_for(target, "fp32", ops)
    if old is None:
        os.environ.pop("MAMBADEPLOY_CACHE")
    else:
        os.environ["MAMBADEPLOY_CACHE"] = old


def small_model(config: ModelConfig, seed=0):
    model = init_random_(empty_model(config), seed=seed).eval()
    model.source = {"kind": "test", "seed": seed}
    return model


def two_layer(router="sigmoid_top1", top_k=1, activation="silu", family="blackmamba"):
    """Mamba + MoE, small and quick to export."""
    return ModelConfig(
        family=family, vocab_size=128, d_model=32, layers=[LayerSpec("mamba", "none"), LayerSpec("none", "moe")],
        mamba=MambaConfig(d_inner=64, d_state=8, d_conv=4),
        moe=MoEConfig(n_experts=4, ffn_size=48, top_k=top_k, router=router, router_bias=router == "sigmoid_top1",
                      activation=activation),
        final_norm="layernorm" if family == "blackmamba" else "rmsnorm", max_seq_len=2048,
    )


def ort_logits(directory, model, ids, lengths, steps):
    """(prefill logits, [step logits]) from ORT and from torch, decoding torch's greedy tokens in both."""
    from mambadeploy.runtime.ort_runner import OrtRunner

    runner = OrtRunner.from_dir(directory)
    got, state = runner.prefill(ids, lengths)
    want, ref_state = model.prefill(ids, lengths)
    pairs = [(got, want)]
    for _ in range(steps):
        tok = want.argmax(-1)
        got, state = runner.step(tok, state)
        want, ref_state = model.step(tok, ref_state)
        pairs.append((got, want))
    return pairs


# --------------------------------------------------------------------------- manifest and graph I/O
def test_manifest_and_graph_io(exported, preset, tiny):
    model = tiny(preset)
    directory = exported(preset)
    m = Manifest.read(directory)
    m.check_files(directory)
    specs = state_specs(model.config, model.dtype)
    names = [s.name for s in specs]
    assert [s.name for s in m.state] == names
    assert [tuple(s.shape) for s in m.state] == [s.shape for s in specs]
    assert (m.family, m.dtype, m.ops, m.opset) == (model.config.family, "float32", "portable", 21)
    assert m.limits["max_length"] == (model.config.max_seq_len if model.config.has_attention else None)
    assert m.checkpoint["source"] == {"kind": "preset", "name": preset, "seed": 0}
    assert m.model_config.to_dict() == model.config.to_dict()
    pre, dec = m.graphs["prefill"], m.graphs["decode"]
    assert [t.name for t in pre.inputs] == ["input_ids", "lengths"]
    assert pre.inputs[0].shape == ["batch", "length"] and pre.inputs[1].shape == ["batch"]
    assert [t.name for t in dec.inputs] == ["input_ids"] + [PAST + n for n in names]
    assert dec.inputs[0].shape == ["batch", 1]
    for g in (pre, dec):
        assert [t.name for t in g.outputs] == ["logits"] + [PRESENT + n for n in names]
        assert g.outputs[0].shape == ["batch", model.config.vocab_size] and g.outputs[0].dtype == "float32"
        proto = onnx.load(str(directory / g.file), load_external_data=False)
        assert {n.domain for n in proto.graph.node} <= {""}, "portable graphs use standard ops only"
    assert m.domains == {}


def test_custom_mode_nodes_and_shapes(tmp_path):
    """--ops custom: one node per Mamba scan / conv and per MoE layer in prefill, attributes per the registry; in decode
    one conv update, state update and routed MoE per layer and one add + RMSNorm per norm after the first, and no
    Gather of expert weights; shape inference types every output (the schemas come from opset.py)."""
    config = two_layer("softmax_topk", 2, "silu", "moe-mamba")
    m = exporter.export_model(small_model(config), tmp_path / "x", ops="custom")
    assert m.ops == "custom" and m.domains == {opset.DOMAIN: opset.OPSET_VERSION}
    proto = onnx.load(str(tmp_path / "x" / "prefill.onnx"))
    custom = [n for n in proto.graph.node if n.domain == opset.DOMAIN]
    counts = {t: sum(n.op_type == t for n in custom) for t in ("SelectiveScan", "CausalConv1d", "TopKExpertGather")}
    assert counts == {"SelectiveScan": 1, "CausalConv1d": 1, "TopKExpertGather": 1}
    for node in custom:
        entry = opset.get_op(node.op_type)
        attrs = entry.check_attributes({a.name: onnx.helper.get_attribute_value(a) for a in node.attribute})
        assert len(node.input) <= len(entry.inputs) and len(node.output) == len(entry.outputs)
        if node.op_type == "TopKExpertGather":
            assert attrs["top_k"] == 2 and attrs["activation"] == opset.ACTIVATION_CODES["silu"]
        if node.op_type == "SelectiveScan":
            assert attrs["delta_softplus"] == 1 and node.input[8:] in ([], [""]), "prefill starts from zero state"
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    typed = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for node in custom:
        for o in node.output:
            assert typed[o].type.tensor_type.shape.dim, f"{node.op_type} output {o} has no inferred shape"
    dec = onnx.load(str(tmp_path / "x" / "decode.onnx"), load_external_data=False)
    ops = [n.op_type for n in dec.graph.node if n.domain == opset.DOMAIN]
    assert {t: ops.count(t) for t in set(ops)} == {"CausalConv1dUpdate": 1, "SelectiveStateUpdate": 1,
                                                    "AddRMSNorm": 1, "RoutedMoE": 1}
    moe = next(n for n in dec.graph.node if n.op_type == "RoutedMoE")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in moe.attribute}
    assert attrs == {"router": opset.ROUTER_CODES["softmax_topk"], "top_k": 2,
                     "activation": opset.ACTIVATION_CODES["silu"]}
    weights = {i.name for i in dec.graph.initializer if len(i.dims) == 3}  # the stacked expert weights
    assert not [n for n in dec.graph.node if n.op_type == "Gather" and set(n.input) & weights]
    inferred = onnx.shape_inference.infer_shapes(dec, strict_mode=True)
    typed = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for node in dec.graph.node:
        if node.domain == opset.DOMAIN:
            assert all(typed[o].type.tensor_type.shape.dim for o in node.output), node.op_type


# --------------------------------------------------------------------------- contrib mode, numerically
@pytest.mark.parametrize("config", [
    two_layer("sigmoid_top1", 1, "silu", "blackmamba"),  # sigmoid top-1: MoE k=1 normalised, times sigmoid outside
    two_layer("softmax_topk", 2, "silu", "moe-mamba"),  # softmax top-2 without renormalisation
], ids=["sigmoid-top1", "softmax-top2"])
def test_contrib_ops_match_reference(config, tmp_path):
    model = small_model(config)
    m = exporter.export_model(model, tmp_path / "x", ops="contrib")
    assert m.domains == {"com.microsoft": 1}
    for name in ("prefill.onnx", "decode.onnx"):
        ops = {(n.domain, n.op_type) for n in onnx.load(str(tmp_path / "x" / name)).graph.node}
        assert {("com.microsoft", "MoE"), ("com.microsoft", "CausalConvWithState")} <= ops
    ids = torch.randint(0, config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(1))
    for i, (got, want) in enumerate(ort_logits(tmp_path / "x", model, ids, torch.tensor([9, 4, 1]), 12)):
        assert_logits_close(got, want, torch.float32, f"contrib step {i}", check="ort_contrib")


def test_contrib_reports_what_does_not_fit(tiny):
    """BlackMamba's released experts are erf-GELU gated: ORT's MoE cannot compute them (checked, see contrib.py)."""
    fits = what_fits(tiny("blackmamba-tiny").config)
    assert fits["MoE"].startswith("does not fit") and "gelu" in fits["MoE"]
    assert what_fits(tiny("moe-mamba-tiny").config)["MoE"].startswith("softmax_topk top-1")


# --------------------------------------------------------------------------- big models: shared external data
def test_external_data_shared_between_graphs(tmp_path, monkeypatch):
    monkeypatch.setattr(exporter, "EXTERNAL_DATA_BYTES", 0)
    model = small_model(two_layer("softmax_topk", 1, "gelu", "moe-mamba"))
    m = exporter.export_model(model, tmp_path / "x")
    files = {p.name for p in (tmp_path / "x").iterdir()}
    assert "prefill.onnx.data" in files
    dec = onnx.load(str(tmp_path / "x" / "decode.onnx"), load_external_data=False)
    locations = {kv.value for t in dec.graph.initializer for kv in t.external_data if kv.key == "location"}
    assert "prefill.onnx.data" in locations, "decode reads the weights prefill wrote"
    assert any(e["file"] == "prefill.onnx.data" for e in m.graphs["decode"].external_data)
    w1 = next(t for t in dec.graph.initializer if t.name.endswith("ffn.w1"))
    assert {kv.key: kv.value for kv in w1.external_data}["location"] == "prefill.onnx.data"
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(2))
    for got, want in ort_logits(tmp_path / "x", model, ids, None, 4):
        assert_logits_close(got, want, torch.float32, check="ort_portable")


# --------------------------------------------------------------------------- files on disk
def test_existing_directory_refused_without_force(tmp_path):
    """A non-export directory is never replaced, and the first message already says that --force will not either; an
    empty directory is taken as it is; an earlier export needs --force."""
    out = tmp_path / "x"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    model = small_model(two_layer())
    for force in (False, True):
        with pytest.raises(MambaDeployError, match="not an export directory .* --force replaces only earlier exports"):
            exporter.export_model(model, out, force=force)
    assert (out / "keep.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    exporter.export_model(model, empty)
    with pytest.raises(MambaDeployError, match="already holds an export; pass --force"):
        exporter.export_model(model, empty)


def test_failed_export_leaves_nothing_and_keeps_the_old_one(tmp_path, monkeypatch):
    out = tmp_path / "x"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"old": True}))

    def boom(*a, **k):
        raise RuntimeError("trace failed")

    monkeypatch.setattr(exporter.graphs, "trace", boom)
    with pytest.raises(RuntimeError, match="trace failed"):
        exporter.export_model(small_model(two_layer()), out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"], "no partial directory left behind"
    assert json.loads((out / "manifest.json").read_text()) == {"old": True}


def test_force_replaces_an_export(tmp_path, monkeypatch):
    """The new export is complete before the old one goes (rename into place), then the old one is removed."""
    out = tmp_path / "x"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    seen = {}

    def fake_export_into(model, tmp, ops, opset_version, desc, say):
        seen["max_batch"] = desc.max_batch
        assert out.exists() and tmp.parent == out.parent
        (tmp / "manifest.json").write_text('{"new": true}')
        return "manifest"

    monkeypatch.setattr(exporter, "_export_into", fake_export_into)
    assert exporter.export_model(small_model(two_layer()), out, force=True, max_batch=8) == "manifest"
    assert seen == {"max_batch": 8}
    assert json.loads((out / "manifest.json").read_text()) == {"new": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]
    assert out.stat().st_mode & 0o777 != 0o700, "the directory gets the usual permissions, not mkdtemp's"


def test_unsupported_layer_is_named():
    config = ModelConfig(family="blackmamba", vocab_size=64, d_model=32,
                         layers=[LayerSpec("mamba", "none"), LayerSpec("attention", "none")],
                         mamba=MambaConfig(d_inner=64), attention={"n_heads": 2, "n_kv_heads": 1, "head_dim": 16})
    with pytest.raises(MambaDeployError, match=r"layer 1 \(attention mixer \+ none feed-forward\)"):
        exporter.export_model(small_model(config), "/nonexistent/never-written")


@pytest.mark.parametrize("kwargs,match", [({"ops": "fast"}, "unknown --ops"), ({"opset_version": 17}, "opset 17"),
                                          ({"max_batch": 0}, "max batch")])
def test_bad_options(kwargs, match, tmp_path):
    with pytest.raises(MambaDeployError, match=match):
        exporter.export_model(small_model(two_layer()), tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_blackmamba_preset_layers_supported():
    from mambadeploy.export.descriptions import description_for

    config = blackmamba_config(4, 64, 96, n_experts=4, vocab=512)
    description_for(config).check_config(config)


def test_missing_onnxscript_names_the_extra(monkeypatch):
    import sys

    from mambadeploy.errors import MissingDependencyError
    from mambadeploy.export import require_export_dependencies

    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(MissingDependencyError, match=r"onnxscript is required for exporting to ONNX.*mambadeploy\[onnx\]"):
        require_export_dependencies()
