"""ORT-CPU against the torch reference: every tiny preset and tiny transformers-built Mamba and Jamba checkpoints, fp32
logits within the measured fp32 bound (tolerances.logits_bound) at prefill and at each of 128 decode steps with
identical greedy tokens; batched prompts of different lengths == single prompts; shapes other than the export's dummy;
every bad input ends in one clear error."""

import json
import os
import shutil
import sys

import pytest
import torch
from components import DEV_INSTALL, require_module
from hf_tiny import fan_in_init

from mambadeploy.errors import InputError, MambaDeployError, MissingDependencyError
from mambadeploy.export.descriptions import description_for
from mambadeploy.export.manifest import ManifestError
from mambadeploy.models.checkpoint import load_model
from mambadeploy.runtime.generate import generate
from mambadeploy.validate.tolerances import assert_logits_close, assert_state_close, rel_to_scale

ort = require_module("onnxruntime", DEV_INSTALL)
from mambadeploy.runtime.ort_runner import OrtRunner, export_for

DECODE_STEPS = 128


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """exported(target, ops="portable") -> fp32 export directory, made once per session (the runtime's export cache)."""
    old = os.environ.get("MAMBADEPLOY_CACHE")
    os.environ["MAMBADEPLOY_CACHE"] = str(tmp_path_factory.getbasetemp() / "mambadeploy-cache")
    yield lambda target, ops="portable": export_for(str(target), "fp32", ops=ops)
    if old is None:
        os.environ.pop("MAMBADEPLOY_CACHE")
    else:
        os.environ["MAMBADEPLOY_CACHE"] = old


# --------------------------------------------------------------------------- tiny transformers checkpoints
@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
    """{"hf-mamba": dir, "hf-jamba": dir}: random tiny models built from configs (no download), save_pretrained."""
    transformers = require_module("transformers", DEV_INSTALL)
    torch.manual_seed(0)
    mamba = transformers.MambaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3, state_size=16,
                                     time_step_rank=4, use_conv_bias=True, tie_word_embeddings=True)
    jamba = transformers.JambaConfig(
        vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_period=3, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
        num_experts=2, num_experts_per_tok=2, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4,
        tie_word_embeddings=False, max_position_embeddings=256, experts_implementation="eager",
        attn_implementation="eager")
    out = {}
    for name, cfg, cls in (("hf-mamba", mamba, transformers.MambaForCausalLM),
                           ("hf-jamba", jamba, transformers.JambaForCausalLM)):
        path = tmp_path_factory.mktemp(name)
        fan_in_init(cls(cfg)).save_pretrained(path)
        out[name] = path
    return out


@pytest.fixture(params=["blackmamba-tiny", "moe-mamba-tiny", "jamba-tiny", "hf-mamba", "hf-jamba"])
def target(request, hf_checkpoints):
    return str(hf_checkpoints.get(request.param, request.param))


def _prompts(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


# --------------------------------------------------------------------------- numerics
def _runs_opset27() -> bool:
    """onnxruntime >= 1.32 runs LinearAttention / CausalConvWithState in the default domain (ONNX opset 27)."""
    import onnxruntime

    return tuple(int(p) for p in onnxruntime.__version__.split(".")[:2]) >= (1, 32)


@pytest.mark.parametrize("ops", ["portable", "custom", "standard"])
def test_prefill_and_128_decode_steps_match_torch(target, ops, exported, tiny):
    """Left-padded batch of 3 prompts; ORT decodes the tokens torch picks (teacher forcing on torch's greedy path), so
    one early disagreement cannot hide later ones; the greedy picks must agree at every step. `custom`: prefill and
    decode through our ORT CPU kernels (scan, conv, expert gather; conv / state update, add + RMSNorm, routed MoE).
    `standard`: the Mamba layers as opset 27's LinearAttention / CausalConvWithState (ORT's own kernels)."""
    if ops == "standard" and not _runs_opset27():
        pytest.skip("--ops standard needs onnxruntime >= 1.32 (opset 27's LinearAttention)")
    model = tiny(target) if not os.path.isdir(target) else load_model(target)
    runner = OrtRunner.from_dir(exported(target, ops))
    from mambadeploy.runtime.generate import pad_prompts

    ids, lengths = pad_prompts(_prompts(model.config.vocab_size, [11, 4, 1]))
    got, state = runner.prefill(ids, lengths)
    want, ref_state = model.prefill(ids, lengths)
    assert_logits_close(got, want, torch.float32, "prefill logits", check=f"ort_{ops}")
    worst = 0.0
    for step in range(DECODE_STEPS):
        tok = want.argmax(-1)
        assert torch.equal(got.argmax(-1), tok), f"greedy token differs at step {step}"
        got, state = runner.step(tok, state)
        want, ref_state = model.step(tok, ref_state)
        worst = max(worst, rel_to_scale(got, want)[0])
        assert_logits_close(got, want, torch.float32, f"{ops} decode step {step}", check="long_decode")
    print(f"worst decode-step error over {DECODE_STEPS} steps: {worst:.3e} of the logit scale")
    for name, t in runner.state_to_torch(state).items():
        assert_state_close(t, ref_state[name], torch.float32, f"{ops} final state {name}", check="long_decode")


def test_custom_decode_writes_the_kv_cache_in_place(exported, tiny):
    """jamba-tiny --ops custom: the decode graph's DecodeAttention caches are bound present = past (no copy of the
    cache per step), and the steps match torch's with the binding on and off (the op then copies the cache)."""
    runner = OrtRunner.from_dir(exported("jamba-tiny", "custom"))
    model = tiny("jamba-tiny")
    attention = [f"L{i}.{kv}" for i, layer in enumerate(model.config.layers) if layer.mixer == "attention"
                 for kv in ("key", "value")]
    assert attention and runner.aliased_states == set(attention)
    ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    got, state = runner.prefill(ids)
    want, ref_state = model.prefill(ids)
    copied = runner.prefill(ids)[1]
    for step in range(4):
        tok = want.argmax(-1)
        before = {n: state.values[n].data_ptr() for n in attention}
        got, state = runner.step(tok, state)
        assert {n: state.values[n].data_ptr() for n in attention} == before  # the same buffers, written in place
        runner.aliased_states, shared = set(), runner.aliased_states
        got_copied, copied = runner.step(tok, copied)
        runner.aliased_states = shared
        assert all(copied.values[n].data_ptr() != state.values[n].data_ptr() for n in attention)
        want, ref_state = model.step(tok, ref_state)
        assert_logits_close(got, want, torch.float32, f"step {step} (in place)")
        assert torch.equal(got, got_copied)


@pytest.mark.parametrize("preset", ["blackmamba-tiny", "jamba-tiny"])
def test_batched_prompts_equal_single_prompts(preset, exported):
    runner = OrtRunner.from_dir(exported(preset))
    prompts = _prompts(512, [13, 2, 7], seed=3)
    batched = generate(runner, prompts, 24).tokens
    single = [generate(runner, [p], 24).tokens[0] for p in prompts]
    assert batched == single


@pytest.mark.parametrize("preset", ["blackmamba-tiny", "moe-mamba-tiny", "jamba-tiny"])
def test_shapes_other_than_the_dummy(preset, exported, tiny):
    """The family description's validation shapes (batch 1 and 3; lengths 1, 7, 33, 154), never the trace's (2, 9)."""
    model = tiny(preset)
    desc = description_for(model.config)
    runner = OrtRunner.from_dir(exported(preset))
    g = torch.Generator().manual_seed(7)
    for batch, length in desc.validation_shapes:
        assert (batch, length) != (desc.dummy_batch, desc.dummy_length)
        ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=g)
        lengths = torch.tensor([length - (3 * i) % length for i in range(batch)])
        got, state = runner.prefill(ids, lengths)
        want, ref_state = model.prefill(ids, lengths)
        assert_logits_close(got, want, torch.float32, f"prefill {batch}x{length}", check="ort_portable")
        for name, t in runner.state_to_torch(state).items():
            assert_state_close(t, ref_state[name], torch.float32, f"{batch}x{length} state {name}",
                               check="ort_portable")


def test_factory_builds_ort_runners(exported):
    from mambadeploy.runtime.factory import make_runner

    directory = exported("moe-mamba-tiny")
    for backend, opts in (("ort", {}), ("ort", {"provider": "cpu"}), ("ort-cpu", {})):
        runner = make_runner(str(directory), backend=backend, **opts)
        assert isinstance(runner, OrtRunner) and runner.describe()["backend"] == "ort-cpu"
    assert make_runner("moe-mamba-tiny", backend="ort").directory == directory, "a preset is exported once, cached"


# --------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def jamba_runner(exported):
    return OrtRunner.from_dir(exported("jamba-tiny"))


@pytest.mark.parametrize("ids,lengths,match", [
    (torch.zeros(2, 3), None, "must be integer token ids"),
    (torch.zeros(2, 3, 1, dtype=torch.int64), None, "must have 2 dimension"),
    (torch.tensor([[1, 512]]), None, r"token id\(s\) \[512\] outside the vocabulary"),
    (torch.tensor([[-1, 2]]), None, "outside the vocabulary"),
    (torch.zeros(2, 0, dtype=torch.int64), None, "empty prompt"),
    (torch.zeros(2, 3, dtype=torch.int64), torch.tensor([3]), "lengths must be 2 integers"),
    (torch.zeros(2, 3, dtype=torch.int64), torch.tensor([3, 4]), r"lengths must be in \[1, 3\]"),
    (torch.zeros(1, 513, dtype=torch.int64), None, "longer than the attention KV cache"),
])
def test_bad_prefill_inputs(jamba_runner, ids, lengths, match):
    with pytest.raises(InputError, match=match):
        jamba_runner.prefill(ids, lengths)


def test_bad_step_inputs(jamba_runner, exported):
    _, state = jamba_runner.prefill(torch.tensor([[1, 2, 3], [4, 5, 6]]))
    with pytest.raises(InputError, match="3 rows but the state holds a batch of 2"):
        jamba_runner.step(torch.tensor([1, 2, 3]), state)
    with pytest.raises(InputError, match="integer token ids"):
        jamba_runner.step(torch.tensor([1.0, 2.0]), state)
    with pytest.raises(InputError, match="state must come from this runner"):
        jamba_runner.step(torch.tensor([1, 2]), {"pos": torch.zeros(2)})
    other = OrtRunner.from_dir(exported("jamba-tiny"))
    with pytest.raises(InputError, match="state must come from this runner"):
        other.step(torch.tensor([1, 2]), state)


def _copy_export(src, dst, edit=None):
    shutil.copytree(src, dst)
    if edit is not None:
        data = json.loads((dst / "manifest.json").read_text())
        edit(data)
        (dst / "manifest.json").write_text(json.dumps(data))
    return dst


def test_limits_from_the_manifest(exported, tmp_path):
    """max_batch and max_length come from the manifest: a smaller limit there is enforced."""
    def shrink(m):
        m["limits"] = {"max_batch": 2, "max_length": 6}

    runner = OrtRunner.from_dir(_copy_export(exported("jamba-tiny"), tmp_path / "x", shrink))
    with pytest.raises(InputError, match="batch of 3 exceeds the export's max batch 2"):
        runner.prefill(torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(InputError, match=r"prompt of 7 tokens is longer"):
        runner.prefill(torch.zeros(1, 7, dtype=torch.int64))
    _, state = runner.prefill(torch.zeros(1, 4, dtype=torch.int64))
    _, state = runner.step(torch.tensor([1]), state)
    _, state = runner.step(torch.tensor([1]), state)
    with pytest.raises(InputError, match="reached the attention KV cache length"):
        runner.step(torch.tensor([1]), state)
    assert runner.max_length == 6


@pytest.mark.parametrize("edit,match", [
    (lambda m: m["graphs"]["decode"]["inputs"][1].update(dtype="float16"), "do not match the manifest"),
    (lambda m: m["graphs"]["prefill"]["outputs"][0].update(shape=["batch", 7]), "has shape"),
    (lambda m: m["graphs"]["decode"].update(sha256="0" * 64), "does not match the manifest"),
    (lambda m: m["graphs"]["prefill"].update(file="missing.onnx"), "missing"),
    (lambda m: m.update(format_version=99), "newer than this mambadeploy"),
    (lambda m: m.pop("state"), "malformed manifest"),
])
def test_manifest_not_matching_graphs(exported, tmp_path, edit, match):
    with pytest.raises(ManifestError, match=match):
        OrtRunner.from_dir(_copy_export(exported("blackmamba-tiny"), tmp_path / "x", edit))


def test_replaced_graph_is_detected(exported, tmp_path):
    d = _copy_export(exported("blackmamba-tiny"), tmp_path / "x")
    shutil.copy(exported("moe-mamba-tiny") / "decode.onnx", d / "decode.onnx")
    with pytest.raises(ManifestError, match="decode.onnx: does not match the manifest"):
        OrtRunner.from_dir(d)


def test_not_an_export_directory(tmp_path):
    with pytest.raises(ManifestError, match="no manifest.json: not an export directory"):
        OrtRunner.from_dir(tmp_path)


def test_unknown_provider(exported):
    with pytest.raises(MambaDeployError, match="unknown ONNX Runtime provider 'tpu'"):
        OrtRunner.from_dir(exported("blackmamba-tiny"), provider="tpu")


def test_missing_onnxruntime_names_the_extra(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'mambadeploy\[onnx\]'"):
        OrtRunner.from_dir(exported("blackmamba-tiny"))


# --------------------------------------------------------------------------- CUDA (the device machine)
def _ort_cuda_available() -> bool:
    if not torch.cuda.is_available():
        return False
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.gpu
@pytest.mark.skipif(not _ort_cuda_available(), reason="needs a CUDA GPU and onnxruntime-gpu")
def test_cuda_graph_decode_matches_plain_and_refuses_stale_states(exported, tiny):
    directory = exported("jamba-tiny")
    plain = OrtRunner.from_dir(directory, "cuda", cuda_graph=False)
    graph = OrtRunner.from_dir(directory, "cuda")
    assert graph.cuda_graph, "CUDA-graph mode is the default on CUDA"
    model = tiny("jamba-tiny")
    ids = torch.randint(0, 512, (3, 9), generator=torch.Generator().manual_seed(4))
    (lp, sp), (lg, sg) = plain.prefill(ids), graph.prefill(ids)
    want, ref_state = model.prefill(ids)
    first = sg
    for step in range(24):
        assert lg.device.type == ("cuda" if step else "cpu"), "CUDA-graph steps leave the logits on the GPU"
        lg = lg.cpu()
        assert_logits_close(lg, lp, torch.float32, f"graph vs plain, step {step}")
        assert_logits_close(lg, want, torch.float32, f"graph vs torch, step {step}")
        tok = want.argmax(-1)
        (lp, sp), (lg, sg) = plain.step(tok, sp), graph.step(tok, sg)
        want, ref_state = model.step(tok, ref_state)
    with pytest.raises(InputError, match="stale state"):
        graph.step(tok, first)


@pytest.mark.gpu
@pytest.mark.skipif(not _ort_cuda_available(), reason="needs a CUDA GPU and onnxruntime-gpu")
@pytest.mark.parametrize("preset", ["blackmamba-tiny", "moe-mamba-tiny", "jamba-tiny"])
def test_cuda_custom_ops_launch_the_aot_triton_kernels_and_match_torch(exported, tiny, preset):
    """One kernel source: on CUDA the scan and MoE nodes launch torch-fast's Triton kernels (compiled ahead of time,
    registered with the library); prefill (several pairs per expert) and batch-3 decode (inside ORT's CUDA graph)
    follow the fp32 reference, and no op falls back to its hand-written kernel."""
    runner = OrtRunner.from_dir(exported(preset, "custom"), "cuda")
    assert runner.aot["on"] and runner.aot["kernels"] > 0, runner.aot
    runner.aot_stats(reset=True)
    model = tiny(preset)
    ids = torch.randint(0, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(5))
    (lg, sg), (want, ref_state) = runner.prefill(ids), model.prefill(ids)
    for step in range(32):
        assert_logits_close(lg.cpu(), want, torch.float32, f"{preset} ORT-CUDA (AOT kernels) vs torch, step {step}")
        tok = want.argmax(-1)
        (lg, sg), (want, ref_state) = runner.step(tok, sg), model.step(tok, ref_state)
    stats = runner.aot_stats()
    print(preset, "AOT", runner.aot, stats)
    assert stats["launches"] > 0 and stats["fallbacks"] == 0, stats


@pytest.mark.parametrize("message,op", [
    ("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for MatMul(13) node with name 'm'",
     "MatMul"),
    ("bool TransformerMemcpyImpl::IsNodeCompatibleWithProvider ... Provider type for Pad node with name 'node_pad' is "
     "not set.", "Pad"),
])
def test_a_missing_ort_kernel_is_named(message, op):
    """What a user saw for Jamba in bf16 on ORT-CUDA (no bf16 Pad): the error names the op, the dtype and the ways out."""
    from types import SimpleNamespace

    from mambadeploy.runtime.ort_runner import missing_kernel_hint

    hint = missing_kernel_hint(message, "cuda", SimpleNamespace(dtype="bfloat16"))
    assert f"no {op} kernel for this bfloat16 graph" in hint and "--ops custom" in hint
    assert missing_kernel_hint("some other failure", "cpu", SimpleNamespace(dtype="float32")) == ""


# --------------------------------------------------------------------------- an export directory is untrusted input
def _untrusted_copy(exported, tmp_path):
    import shutil

    src = tmp_path / "exp"
    shutil.copytree(exported("blackmamba-tiny"), src)
    return src


def test_graph_path_outside_the_directory_is_refused(exported, tmp_path):
    """A manifest naming ../elsewhere/evil.onnx, with the sha256 updated to match, is refused before ORT reads it."""
    import json as j
    import shutil

    from mambadeploy.errors import ManifestPathError
    from mambadeploy.export.manifest import sha256_file

    src = _untrusted_copy(exported, tmp_path)
    (tmp_path / "elsewhere").mkdir()
    evil = tmp_path / "elsewhere" / "evil.onnx"
    shutil.copy(src / "decode.onnx", evil)
    m = j.loads((src / "manifest.json").read_text())
    m["graphs"]["decode"].update(file="../elsewhere/evil.onnx", sha256=sha256_file(evil))
    (src / "manifest.json").write_text(j.dumps(m))
    with pytest.raises(ManifestPathError, match="resolves outside the directory"):
        OrtRunner.from_dir(src)


def test_symlinked_graph_and_external_data_outside_are_refused(exported, tmp_path):
    import json as j

    import onnx

    from mambadeploy.errors import ManifestPathError
    from mambadeploy.export.manifest import sha256_file

    src = _untrusted_copy(exported, tmp_path)
    outside = tmp_path / "outside.onnx"
    (src / "decode.onnx").rename(outside)
    (src / "decode.onnx").symlink_to(outside)
    with pytest.raises(ManifestPathError, match="decode graph file"):
        OrtRunner.from_dir(src, check_hashes=False)
    (src / "decode.onnx").unlink()
    outside.rename(src / "decode.onnx")
    proto = onnx.load(str(src / "prefill.onnx"))
    init = proto.graph.initializer[0]
    init.data_location = onnx.TensorProto.EXTERNAL
    init.external_data.add(key="location", value="../../etc/passwd")
    (src / "prefill.onnx").write_bytes(proto.SerializeToString())  # onnx.save itself refuses ".."
    m = j.loads((src / "manifest.json").read_text())  # the manifest updated to match, as an attacker would
    m["graphs"]["prefill"].update(bytes=(src / "prefill.onnx").stat().st_size, sha256=sha256_file(src / "prefill.onnx"))
    (src / "manifest.json").write_text(j.dumps(m))
    with pytest.raises(ManifestPathError, match="external data of prefill.onnx"):
        OrtRunner.from_dir(src)


@pytest.mark.parametrize("ops", ["portable", "custom"])
def test_onnx_runtime_fuses_every_norm(exported, ops):
    """Every RMSNorm of the exported graphs is written in the pattern ONNX Runtime fuses (Pow-ReduceMean-Add-Sqrt-Div-
    Mul): in the session's optimised decode graph of jamba-tiny (block norms, final norm, Mamba's dt/B/C norms) none of
    the unfused pieces is left, each norm one SimplifiedLayerNormalization (or our AddRMSNorm node, --ops custom)."""
    import onnx
    import onnxruntime as ort

    from mambadeploy.models.layers import RMSNorm

    directory = exported("jamba-tiny", ops)
    norms = sum(isinstance(m, RMSNorm) for m in load_model("jamba-tiny").modules())
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(directory.parent / f"fused-{ops}.onnx")
    if ops == "custom":
        from mambadeploy.plugins.ort.build import register

        register(opts)
    ort.InferenceSession(str(directory / "decode.onnx"), opts, providers=["CPUExecutionProvider"])
    kinds = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
    print(f"{ops}: {norms} norms -> {kinds.count('SimplifiedLayerNormalization')} SimplifiedLayerNormalization, "
          f"{kinds.count('AddRMSNorm')} AddRMSNorm")
    assert not {"Pow", "Sqrt", "Reciprocal", "Div"} & set(kinds)
    assert kinds.count("SimplifiedLayerNormalization") + kinds.count("AddRMSNorm") == norms
