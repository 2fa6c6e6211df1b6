"""(e) The pure parts of the TensorRT code, without TensorRT: attribute packing, shape/dtype rules (checked against the
references' real outputs), profile computation, fingerprints, graph preparation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mambadeploy.errors import InputError, MambaDeployError
from mambadeploy.opset import REGISTRY, get_op
from mambadeploy.plugins import trt_fields, trt_graph, trt_rules
from mambadeploy.trt import fingerprint as fp
from mambadeploy.trt import profiles as pr

from op_graphs import single_op_model  # tests/plugins is on sys.path (pytest prepend mode)


# ------------------------------------------------------------------ attribute packing
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_fields_round_trip_with_defaults(name):
    entry = get_op(name)
    packed = trt_fields.pack(entry, {})
    assert [n for n, _ in packed] == list(entry.attributes)
    kinds = {n: kind for n, (kind, _) in entry.attributes.items()}
    assert all(a.dtype == (np.float32 if kinds[n] == "float" else np.int32) and a.shape == (1,) for n, a in packed)
    assert trt_fields.unpack(entry, packed) == pytest.approx(entry.check_attributes({}), rel=1e-7)  # float fields: fp32


def test_fields_carry_values_and_refuse_unknown_or_bad():
    entry = get_op("TopKExpertGather")
    attrs = trt_fields.unpack(entry, trt_fields.pack(entry, {"top_k": 2, "activation": 1}))
    assert attrs == {"activation": 1, "top_k": 2}
    assert trt_fields.unpack(entry, [("top_k", np.array([2])), ("plugin_version", b"1")])["top_k"] == 2
    with pytest.raises(MambaDeployError, match="unknown plugin field 'alpha'"):
        trt_fields.unpack(entry, [("alpha", np.array([1]))])
    with pytest.raises(MambaDeployError, match="unknown attributes"):
        trt_fields.pack(entry, {"alpha": 1})
    with pytest.raises(MambaDeployError, match="does not fit int32"):
        trt_fields.pack(entry, {"top_k": 1 << 40})
    with pytest.raises(MambaDeployError, match="holds 2 values"):
        trt_fields.unpack(entry, [("top_k", np.array([1, 2]))])


# ------------------------------------------------------------------ shape and dtype rules vs the references
def _ref_outputs(name, dtype):
    g = torch.Generator().manual_seed(0)
    t = getattr(torch, dtype)
    if name == "SelectiveScan":
        b, d, L, n = 3, 5, 7, 4
        args = dict(u=torch.randn(b, d, L, generator=g).to(t), delta=torch.randn(b, d, L, generator=g).to(t),
                    A=-torch.rand(d, n, generator=g), B=torch.randn(b, n, L, generator=g).to(t),
                    C=torch.randn(b, n, L, generator=g).to(t), D=torch.randn(d, generator=g).to(t),
                    z=torch.randn(b, d, L, generator=g).to(t), delta_bias=torch.randn(d, generator=g).to(t),
                    initial_state=torch.randn(b, d, n, generator=g))
        outs = get_op(name).resolve("reference")(**args, delta_softplus=True)
    elif name == "CausalConv1d":
        b, d, L, k = 3, 5, 7, 4
        args = dict(x=torch.randn(b, d, L, generator=g).to(t), weight=torch.randn(d, k, generator=g).to(t),
                    bias=torch.randn(d, generator=g).to(t), initial_state=torch.randn(b, d, k, generator=g))
        outs = get_op(name).resolve("reference")(**args, activation="silu")
    elif name == "CausalConv1dUpdate":
        b, d, k = 3, 5, 4
        args = dict(x=torch.randn(b, d, generator=g).to(t), conv_state=torch.randn(b, d, k, generator=g),
                    weight=torch.randn(d, k, generator=g).to(t), bias=torch.randn(d, generator=g).to(t))
        outs = get_op(name).resolve("reference")(**args, activation="silu")
    elif name == "SelectiveStateUpdate":
        b, d, n = 3, 5, 4
        args = dict(state=torch.randn(b, d, n, generator=g), x=torch.randn(b, d, generator=g).to(t),
                    dt=torch.randn(b, d, generator=g).to(t), A=-torch.rand(d, n, generator=g),
                    B=torch.randn(b, n, generator=g).to(t), C=torch.randn(b, n, generator=g).to(t),
                    D=torch.randn(d, generator=g).to(t), z=torch.randn(b, d, generator=g).to(t),
                    dt_bias=torch.randn(d, generator=g).to(t))
        outs = get_op(name).resolve("reference")(**args, dt_softplus=True)
    elif name == "AddRMSNorm":
        args = dict(x=torch.randn(3, 8, generator=g).to(t), residual=torch.randn(3, 8, generator=g),
                    weight=torch.randn(8, generator=g).to(t))
        outs = get_op(name).resolve("reference")(**args, eps=1e-5)
    elif name == "DecodeAttention":  # GQA 4 on 2 heads, a 9-slot cache
        args = dict(q=torch.randn(3, 4, 6, generator=g).to(t), k=torch.randn(3, 2, 6, generator=g).to(t),
                    v=torch.randn(3, 2, 6, generator=g).to(t), key_cache=torch.randn(3, 2, 9, 6, generator=g).to(t),
                    value_cache=torch.randn(3, 2, 9, 6, generator=g).to(t), pos=torch.tensor([0, 8, 3]))
        outs = get_op(name).resolve("reference")(**args)
    elif name == "SparseLinear":
        args = dict(x=torch.randn(6, 8, generator=g).to(t), weight=torch.randn(5, 8, generator=g).to(t),
                    bias=torch.randn(5, generator=g).to(t))
        outs = (get_op(name).resolve("reference")(**args, mode=0.1, threshold=0.5),)
    elif name == "RoutedMoE":
        T, d, f, e = 6, 8, 5, 3
        args = dict(x=torch.randn(T, d, generator=g).to(t), router_weight=torch.randn(e, d, generator=g).to(t),
                    router_bias=torch.randn(e, generator=g).to(t), w1=torch.randn(e, 2 * f, d, generator=g).to(t),
                    w2=torch.randn(e, d, f, generator=g).to(t))
        outs = (get_op(name).resolve("reference")(**args, router="softmax_topk", top_k=2, activation="silu"),)
    else:
        T, d, f, e = 6, 8, 5, 3
        args = dict(x=torch.randn(T, d, generator=g).to(t), w1=torch.randn(e, 2 * f, d, generator=g).to(t),
                    w2=torch.randn(e, d, f, generator=g).to(t), experts=torch.randint(0, e, (T, 2), generator=g),
                    weights=torch.rand(T, 2, generator=g))
        outs = (get_op(name).resolve("reference")(**args, activation="gelu"),)
    return list(args.values()), outs


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_shape_and_dtype_rules_match_reference_outputs(name, dtype):
    entry = get_op(name)
    inputs, outs = _ref_outputs(name, dtype)
    shapes = [tuple(x.shape) for x in inputs]
    dtypes = [str(x.dtype).replace("torch.", "") for x in inputs]
    assert trt_rules.output_shapes(entry, shapes) == tuple(tuple(o.shape) for o in outs)
    assert trt_rules.output_dtypes(entry, dtypes) == tuple(str(o.dtype).replace("torch.", "") for o in outs)
    # the same rule over symbolic dims (what TensorRT hands the plugin as expressions)
    sym = [tuple(f"{i}_{j}" for j in range(len(s))) for i, s in enumerate(shapes)]
    assert len(trt_rules.output_shapes(entry, sym)) == len(entry.outputs)


def test_format_checks_follow_type_classes():
    entry = get_op("SelectiveScan")
    T = ["float16"] * 2
    assert trt_rules.accepts(entry, 1, T)
    assert not trt_rules.accepts(entry, 1, ["float16", "bfloat16"])  # T inputs must agree
    full = ["float16", "float16", "float32", "float16", "float16", "float16", "float16", "float32", "float32"]
    assert trt_rules.accepts(entry, 8, full)
    assert not trt_rules.accepts(entry, 8, full[:8] + ["float16"])  # states are fp32 only
    assert trt_rules.accepts(entry, 9, full + ["float16"]) and not trt_rules.accepts(entry, 9, full + ["float32"])
    assert trt_rules.accepts(entry, 10, full + ["float16", "float32"])
    gather = get_op("TopKExpertGather")
    assert trt_rules.accepts(gather, 3, ["float32"] * 3 + ["int32"])
    assert not trt_rules.accepts(gather, 3, ["float32"] * 3 + ["float32"])
    with pytest.raises(MambaDeployError, match="input 'initial_state' has dtype float16"):
        trt_rules.check_input_dtypes(entry, full[:8] + ["float16"])


# ------------------------------------------------------------------ profiles
def test_profile_from_symbolic_dims():
    limits = pr.make_limits(max_batch=8, max_prompt=512)
    assert (limits.opt_batch, limits.opt_prompt) == (4, 128)
    prof = pr.input_profile({"input_ids": ("batch", "length"), "lengths": ("batch",), "past.L0.ssm": ("batch", 6, 4),
                             "A": (6, 4)}, limits)
    assert prof["input_ids"] == ((1, 1), (4, 128), (8, 512))
    assert prof["past.L0.ssm"] == ((1, 6, 4), (4, 6, 4), (8, 6, 4))
    assert "A" not in prof
    assert pr.input_profile({"x": ("tokens", 8)}, limits)["x"] == ((1, 8), (512, 8), (4096, 8))


def test_profile_refusals_name_the_fix():
    with pytest.raises(MambaDeployError, match="KV cache length 64"):
        pr.make_limits(2, 128, max_seq_len=64)
    with pytest.raises(MambaDeployError, match="--opt-batch 9"):
        pr.make_limits(8, 16, opt_batch=9)
    with pytest.raises(MambaDeployError, match="'s17' is dynamic"):
        pr.input_profile({"x": ("s17", 3)}, pr.make_limits(2, 2))
    with pytest.raises(MambaDeployError, match="unnamed dynamic dim"):
        pr.input_profile({"x": (-1, 3)}, pr.make_limits(2, 2))
    prof = pr.input_profile({"input_ids": ("batch", "length")}, pr.make_limits(2, 16))
    pr.check_within(prof, {"input_ids": (2, 16)})
    with pytest.raises(InputError, match=r"batch = 3 is outside the engine's profile \[1, 2\]; rebuild"):
        pr.check_within(prof, {"input_ids": (3, 4)}, "mambadeploy build X --out Y --max-batch 4")
    with pytest.raises(InputError, match=r"dim 1 = 17"):
        pr.check_within(prof, {"input_ids": (1, 17)})


# ------------------------------------------------------------------ fingerprints
def test_fingerprint_changes_with_each_field_and_explains(tmp_path):
    base = dict(graph_sha="a" * 64, plugins={"SelectiveScan": 1, "sources": "x"}, trt={"target": "rtx", "version": "1"},
                gpu="rtx:SM89", flags={"precision": "fp16"})
    f0 = fp.fingerprint(**base)
    assert f0 == fp.fingerprint(**dict(base))
    for key, value in (("graph_sha", "b" * 64), ("plugins", {"SelectiveScan": 2, "sources": "x"}),
                       ("trt", {"target": "rtx", "version": "2"}), ("gpu", "rtx:SM120"), ("flags", {"precision": "bf16"})):
        changed = dict(base, **{key: value})
        assert fp.fingerprint(**changed) != f0, key
        assert len(fp.explain_mismatch(fp.describe(**base), fp.describe(**changed))) == 1
    onnx_path = tmp_path / "g.onnx"
    import onnx

    onnx.save(single_op_model("CausalConv1d"), str(onnx_path))
    s1 = fp.graph_sha(onnx_path)
    onnx.save(single_op_model("CausalConv1d", seed=1), str(onnx_path))
    assert fp.graph_sha(onnx_path) != s1
    versions = fp.plugin_versions()
    assert versions["SelectiveScan"] == 1 and len(versions["sources"]) == 16


# ------------------------------------------------------------------ graph preparation
def test_omitted_optional_inputs_become_zeros_and_z_is_refused():
    import onnx

    model = single_op_model("SelectiveScan", omit=("D", "initial_state"))
    changes = trt_graph.fill_optional_inputs(model)
    assert len(changes) == 2
    node = [n for n in model.graph.node if n.op_type == "SelectiveScan"][0]
    assert all(node.input) and len(node.input) == 9
    assert [i for n in model.graph.node for i in n.input if i == ""] == []
    # the zero tensors really have the right shapes: run the prepared subgraph (without our node) in ORT
    import onnxruntime as ort

    sub = onnx.helper.make_graph([n for n in model.graph.node if n.op_type != "SelectiveScan"], "zeros",
                                 list(model.graph.input), [onnx.helper.make_tensor_value_info(node.input[i], 1, None)
                                                           for i in (5, 8)], initializer=list(model.graph.initializer))
    m2 = onnx.helper.make_model(sub, opset_imports=[onnx.helper.make_opsetid("", 17)])
    m2.ir_version = 8
    sess = ort.InferenceSession(m2.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: np.zeros([3 if d.dim_param == "batch" else 5 if d.dim_param == "length" else d.dim_value
                               for d in i.type.tensor_type.shape.dim], np.float32) for i in model.graph.input}
    D, h0 = sess.run(None, feeds)
    assert D.shape == (6,) and h0.shape == (3, 6, 4) and not D.any() and not h0.any()
    with pytest.raises(MambaDeployError, match="omits input 'z'"):
        trt_graph.fill_optional_inputs(single_op_model("SelectiveScan", omit=("z",)))


def test_build_refuses_an_export_whose_manifest_is_not_json(tmp_path):
    from mambadeploy.trt.build import read_export

    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(MambaDeployError, match="manifest.json: not valid JSON"):
        read_export(tmp_path)
