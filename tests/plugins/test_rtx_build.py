"""(b) ONNX -> network -> plan through TensorRT-RTX with our IPluginV3 plugins registered, on this CPU machine (no GPU
needed to build). Every build runs in a child process (mambadeploy.trt.build_worker): TensorRT-RTX aborts the process on
some faults, and it must find its unversioned library name at process start (plugins/trt_lib.py)."""

from __future__ import annotations

import json

import pytest
from components import DEV_INSTALL, require, require_module

from mambadeploy.errors import MambaDeployError
from mambadeploy.plugins import trt_lib

require(trt_lib.is_available("rtx"), "TensorRT-RTX", "pip install 'mambadeploy[rtx]'; the plan-build tests need it")

from op_graphs import save, single_op_model  # noqa: E402  (tests/plugins is on sys.path)

from mambadeploy.trt import build as tb  # noqa: E402
from mambadeploy.trt import engine_dir as ed  # noqa: E402


def _build(tmp_path, model, name="g"):
    onnx_path = save(model, tmp_path / f"{name}.onnx")
    summary = tb.graph_summary(onnx_path)
    from mambadeploy.trt import profiles as pr

    profile = pr.input_profile(summary["inputs"], pr.make_limits(3, 40))
    job = {"target": "rtx", "onnx_path": onnx_path, "plan_path": str(tmp_path / f"{name}.plan"),
           "profiles": {k: [list(s) for s in v] for k, v in profile.items()}, "log_path": str(tmp_path / "log.txt")}
    return tb.run_worker(job, progress=lambda m: None)


CASES = [  # (op, graph kwargs): every op in each activation dtype, parameters in fp32 and in the model dtype
    ("SelectiveScan", {"dtype": "float32"}), ("SelectiveScan", {"dtype": "float16"}),
    ("SelectiveScan", {"dtype": "bfloat16", "param_dtype": "float32"}),
    ("SelectiveScan", {"dtype": "float16", "omit": ("D", "delta_bias", "initial_state")}),
    ("CausalConv1d", {"dtype": "float32"}), ("CausalConv1d", {"dtype": "bfloat16", "omit": ("bias", "initial_state")}),
    ("TopKExpertGather", {"dtype": "float32"}), ("TopKExpertGather", {"dtype": "float16", "top_k": 2}),
    ("CausalConv1dUpdate", {"dtype": "float16", "omit": ("bias",)}), ("SelectiveStateUpdate", {"dtype": "bfloat16"}),
    ("SelectiveStateUpdate", {"dtype": "float32", "omit": ("D", "dt_bias")}), ("AddRMSNorm", {"dtype": "float16"}),
    ("RoutedMoE", {"dtype": "float32"}), ("RoutedMoE", {"dtype": "bfloat16", "omit": ("router_bias",)}),
    ("DecodeAttention", {"dtype": "float16"}), ("DecodeAttention", {"dtype": "bfloat16"}),
    ("SparseLinear", {"dtype": "float16"}), ("SparseLinear", {"dtype": "bfloat16", "omit": ("bias",)}),
]


@pytest.mark.parametrize("op,kw", CASES, ids=[f"{o}-{'-'.join(map(str, k.values()))}" for o, k in CASES])
def test_plan_builds_with_plugin(tmp_path, op, kw):
    attrs = {"top_k": kw["top_k"]} if "top_k" in kw else None
    result = _build(tmp_path, single_op_model(op, attrs=attrs, **kw))
    print(json.dumps(result))
    assert result["ok"], result
    assert result["layers"].get("PLUGIN_V3") == 1
    assert result["plan_bytes"] > 1000 and (tmp_path / "g.plan").stat().st_size == result["plan_bytes"]


_ALIAS_PROBE = """
import json, sys
from op_graphs import single_op_model
from mambadeploy.plugins import trt_lib, trt_v3
trt = trt_lib.import_trt("rtx")
asked, workspace, make = [], [], trt_v3.plugin_classes
def spy(trt_, entry, namespace=trt_v3.NAMESPACE):
    plugin, creator = make(trt_, entry, namespace)
    if entry.name == "DecodeAttention":
        answer = plugin.get_aliased_input
        plugin.get_aliased_input = lambda self, i: asked.append((i, answer(self, i))) or answer(self, i)
        size = plugin.get_workspace_size
        plugin.get_workspace_size = lambda self, i, o: workspace.append(size(self, i, o)) or size(self, i, o)
    return plugin, creator
trt_v3.plugin_classes = spy
trt_v3.register_plugins(trt)
logger = trt.Logger(trt.Logger.ERROR)
builder = trt.Builder(logger)
network = builder.create_network(0)
assert trt.OnnxParser(network, logger).parse(single_op_model("DecodeAttention", dtype="float16").SerializeToString())
config = builder.create_builder_config()
config.set_preview_feature(trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03, True)
profile = builder.create_optimization_profile()
for i in range(network.num_inputs):
    t = network.get_input(i)
    profile.set_shape(t.name, *[tuple(b if d == -1 else d for d in t.shape) for b in (1, 2, 3)])
config.add_optimization_profile(profile)
plan = builder.build_serialized_network(network, config)
print(json.dumps({"plan_bytes": plan.nbytes if plan is not None else 0, "asked": sorted(set(asked)),
                  "workspace": sorted(set(workspace))}))
"""


def test_decode_attention_plan_declares_present_aliases_past():
    """TensorRT-RTX asks the DecodeAttention plugin (IPluginV3OneBuildV2) which input each output aliases and gets
    present_key -> key_cache (3), present_value -> value_cache (4), and its workspace at the profile's max shapes (batch
    3: lengths, log-sum-exps, fp32 partials, 256-byte aligned): the plan builds with the caches aliased."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    env = trt_lib.plan_env("rtx", dict(os.environ, PYTHONPATH=os.pathsep.join([str(here.parents[1]), str(here)])))
    r = subprocess.run([sys.executable, "-c", _ALIAS_PROBE], env=env, capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    print(result)
    assert result["plan_bytes"] > 1000 and result["asked"] == [[0, -1], [1, 3], [2, 4]]
    assert result["workspace"] == [256 + 256 + 768]  # 37 slots: one split; 3 x 4 x 12 fp32 partials, 256-aligned


@pytest.mark.parametrize("op,kw,why", [
    ("SelectiveScan", {"omit": ("z",)}, "omits input 'z'"),
])
def test_refused_graphs_say_why(tmp_path, op, kw, why):
    result = _build(tmp_path, single_op_model(op, **kw))
    assert not result["ok"] and why in result["message"]


def test_state_in_fp16_is_refused_by_the_format_check(tmp_path):
    """An fp16 recurrent state breaks the op's type classes: TensorRT finds no supported format and says so."""
    import onnx

    model = single_op_model("CausalConv1d")
    for vi in model.graph.input:
        if vi.name == "initial_state":
            vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    result = _build(tmp_path, model)
    assert not result["ok"]
    assert "could not build" in result["message"] or result["parse_errors"], result
    assert "CausalConv1d" in (tmp_path / "log.txt").read_text()


def _fake_export(tmp_path):
    import json as j

    export = tmp_path / "export"
    export.mkdir()
    save(single_op_model("SelectiveScan", omit=("initial_state",)), export / "prefill.onnx")
    save(single_op_model("CausalConv1d"), export / "decode.onnx")
    (export / "manifest.json").write_text(j.dumps({"config": {}, "ops": "custom"}))
    return export


def test_portable_export_is_refused_with_the_command_that_fixes_it(tmp_path):
    """The default export (--ops portable) holds ScatterElements-with-reduction and a Scan that TensorRT's parser
    refuses (a new user saw 'UNSUPPORTED_NODE_ATTR' and no hint): build says what to do instead, before any work."""
    import json as j

    export = _fake_export(tmp_path)
    (export / "manifest.json").write_text(j.dumps({"config": {}, "ops": "portable"}))
    with pytest.raises(MambaDeployError, match="exported with --ops portable.*--ops custom"):
        tb.build_engines(export, tmp_path / "engines", target="rtx")


def test_build_command_caches_detects_corruption_and_refuses_bad_versions(tmp_path):
    export, out = _fake_export(tmp_path), tmp_path / "engines"
    lines = []
    m1 = tb.build_engines(export, out, target="rtx", max_batch=2, max_prompt=32, progress=lines.append)
    assert set(m1["engines"]) == {"prefill", "decode"} and (out / "build.log").stat().st_size > 0
    assert any("building" in line for line in lines)
    lines.clear()
    m2 = tb.build_engines(export, out, target="rtx", max_batch=2, max_prompt=32, progress=lines.append)
    assert all("unchanged" in line for line in lines) and m2["engines"] == m1["engines"]
    # other flags -> rebuilt (new fingerprint)
    m3 = tb.build_engines(export, out, target="rtx", max_batch=4, max_prompt=32, progress=lambda m: None)
    assert m3["engines"]["prefill"]["fingerprint"] != m1["engines"]["prefill"]["fingerprint"]
    # a corrupt engine file is refused on load, and rebuilt by the next build
    path = ed.engine_path(out, "decode")
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(MambaDeployError, match="is corrupt .* rebuild with: mambadeploy build"):
        ed.load_engine_bytes(out, ed.read_manifest(out), "decode")
    lines.clear()
    tb.build_engines(export, out, target="rtx", max_batch=4, max_prompt=32, progress=lines.append)
    assert any(line.startswith("decode: building") for line in lines)
    ed.load_engine_bytes(out, ed.read_manifest(out), "decode")
    # an op version this mambadeploy does not implement
    model = single_op_model("CausalConv1d")
    for a in model.graph.node[0].attribute:
        if a.name == "plugin_version":
            a.s = b"7"
    save(model, export / "decode.onnx")
    with pytest.raises(MambaDeployError, match="version 7 is not supported"):
        tb.build_engines(export, out, target="rtx", max_batch=4, max_prompt=32, progress=lambda m: None)
    with pytest.raises(MambaDeployError, match="TensorRT-RTX builds the graph's own types"):
        tb.build_engines(export, out, target="rtx", precision="fp16", progress=lambda m: None)
    with pytest.raises(MambaDeployError, match="not an export directory"):
        tb.build_engines(tmp_path / "nowhere", out, target="rtx")


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["blackmamba-tiny", "jamba-tiny"])
def test_real_custom_op_export_builds(tmp_path, tiny, preset):
    """The exporter, --ops custom: prefill and decode plans build with every plugin of the registry registered; the
    decode plan holds the decode step's plugins (conv / state update, add + RMSNorm, routed MoE; jamba's attention as
    DecodeAttention)."""
    export_model = require_module("mambadeploy.export.exporter", DEV_INSTALL).export_model
    export_model(tiny(preset), tmp_path / "export", ops="custom")
    manifest = tb.build_engines(tmp_path / "export", tmp_path / "engines", target="rtx", max_batch=2, max_prompt=32,
                                progress=print)
    prefill, decode = manifest["engines"]["prefill"], manifest["engines"]["decode"]
    assert set(prefill["custom_ops"]) == {"SelectiveScan", "CausalConv1d", "TopKExpertGather", "AddRMSNorm"}
    attention = {"DecodeAttention"} if preset == "jamba-tiny" else set()
    assert set(decode["custom_ops"]) == {"CausalConv1dUpdate", "SelectiveStateUpdate", "AddRMSNorm", "RoutedMoE",
                                         *attention}
    assert prefill["layers"]["PLUGIN_V3"] >= 3 and decode["layers"]["PLUGIN_V3"] >= 4 and decode["bytes"] > 0
