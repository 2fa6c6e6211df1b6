"""`mambadeploy validate` end to end with torch runners (CPU): passes on every tiny preset, writes JSON that follows its
schema and an HTML report with its plots; a perturbed weight fails with the backend and (per-layer) the layer named."""

import json

import pytest
import torch

from mambadeploy.cli import main
from mambadeploy.models.checkpoint import load_model
from mambadeploy.models.presets import TINY_PRESETS
from mambadeploy.runtime.torch_eager import TorchEagerRunner
from mambadeploy.validate import harness
from mambadeploy.validate.output import check_schema, load_schema

jsonschema = pytest.importorskip("jsonschema")  # a dev extra: CI has it; the bare device machine may not


def _validate(tmp_path, *args):
    out = tmp_path / "r.json"
    rc = main(["validate", *args, "--json", str(out), "--report", str(tmp_path / "r.html"), "--quiet"])
    return rc, json.loads(out.read_text()) if out.exists() else None


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_tiny_presets_pass_torch_vs_torch(tmp_path, preset, capsys):
    rc, result = _validate(tmp_path, preset, "--backends", "torch,torch:fp16", "--new-tokens", "12",
                           "--prompt-len", "7", "--num-prompts", "2")
    printed = capsys.readouterr().out
    print(printed)
    assert rc == 0 and result["passed"]
    jsonschema.validate(result, load_schema())
    by_label = {b["label"]: b for b in result["backends"]}
    assert by_label["torch:fp32"]["logits"]["worst"]["max_rel"] == 0.0  # the reference against itself
    fp16 = by_label["torch:fp16"]
    assert 0 < fp16["logits"]["worst"]["max_rel"] <= fp16["tolerance"]["logits_max_rel"]
    assert len(fp16["logits"]["decode_steps"]) == 11 and fp16["latency"]["decode_steps"] == 11
    assert fp16["roofline"]["percent"] is None and fp16["roofline"]["note"] == "n/a on CPU"
    assert "PASSED" in printed and "torch:fp16" in printed
    html = (tmp_path / "r.html").read_text()
    assert html.count("<svg") == 2 and "n/a" in html  # error and latency plots; no roofline on CPU


def test_schema_rejects_a_broken_document(tmp_path):
    rc, result = _validate(tmp_path, "blackmamba-tiny", "--backends", "torch", "--new-tokens", "3")
    assert rc == 0
    check_schema(result)
    del result["backends"][0]["latency"]
    with pytest.raises(jsonschema.ValidationError):
        check_schema(result)
    result["backends"] = []
    result["passed"] = "yes"
    with pytest.raises(jsonschema.ValidationError):
        check_schema(result)


def test_perturbed_weight_fails_and_per_layer_names_the_layer(tmp_path, monkeypatch):
    """A candidate with one MoE weight of layer 1 perturbed: the backend fails, and per-layer drift points at layer 1
    (not at layer 2, the next one with a state). fp32: judged by the fixed bounds."""
    bad = load_model("blackmamba-tiny")
    with torch.no_grad():
        bad.layers[1].ffn.w2[:, 0, :] += 0.5
    monkeypatch.setattr(harness, "_make_runner", lambda *a, **k: TorchEagerRunner(bad))
    result = harness.run_validation(harness.ValidateOptions("blackmamba-tiny", backends="torch", new_tokens=8,
                                                            per_layer=True))
    check_schema(result)
    entry = result["backends"][0]
    print(entry["failures"], entry["per_layer"]["layers"])
    assert not result["passed"] and entry["status"] == "failed" and entry["label"] == "torch:fp32"
    assert any("logits max error" in f for f in entry["failures"])
    pl = entry["per_layer"]
    assert pl["first_bad_layer"] == 1 and pl["first_bad_kind"] == "moe"
    assert pl["first_bad_tensor"] == "L1.out"
    assert all(l["ok"] for l in pl["layers"] if l["layer"] < 1)


@pytest.mark.parametrize("args, message", [
    (["--backends", "torch,tensorrt"], "unknown backend 'tensorrt'"),
    (["--backends", "torch:int4"], "unknown dtype 'int4'"),
    (["--new-tokens", "0"], "--new-tokens must be >= 1"),
    (["--num-prompts", "0"], "--num-prompts and --prompt-len must be >= 1"),
])
def test_bad_arguments_are_one_line_errors(args, message, capsys):
    rc = main(["validate", "blackmamba-tiny", "--quiet", *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_prompts_out_of_vocabulary(tmp_path, capsys):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([[1, 2, 3], [4, 5, 512]]))  # tiny vocab is 512
    rc = main(["validate", "blackmamba-tiny", "--backends", "torch", "--prompts", str(prompts), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "prompt 1 has token id(s) [512] outside the model's vocabulary [0, 512)" in err
    rc = main(["validate", "blackmamba-tiny", "--prompts", str(prompts), "--num-prompts", "3", "--quiet"])
    assert rc == 2 and "either --prompts FILE or --num-prompts" in capsys.readouterr().err


def test_missing_dependency_names_the_install_command(monkeypatch, capsys):
    from mambadeploy.validate import backends

    real = backends._has_module
    monkeypatch.setattr(backends, "_has_module", lambda m: False if m == "onnxruntime" else real(m))
    rc = main(["validate", "blackmamba-tiny", "--backends", "torch,ort-cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "ort-cpu needs onnxruntime" in err and "pip install 'mambadeploy[onnx]'" in err


def test_default_backends_skip_with_reasons(tmp_path):
    rc, result = _validate(tmp_path, "blackmamba-tiny", "--new-tokens", "4")
    skipped = {b["backend"]: b["reason"] for b in result["backends"] if b["status"] == "skipped"}
    assert rc == 0 and result["settings"]["backends_chosen_by"] == "default"
    if not torch.cuda.is_available():
        assert {"torch-fast", "ort-cuda", "trt"} <= set(skipped)
        assert all("needs a CUDA GPU" in skipped[n] for n in ("torch-fast", "ort-cuda", "trt"))
