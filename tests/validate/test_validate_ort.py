"""`mambadeploy validate` with ONNX Runtime (CPU): every tiny preset passes torch + ORT-CPU; a corrupted export (one
weight perturbed in the ONNX initializers) fails with ort-cpu named and, with --per-layer, the perturbed layer named;
an export of another model is refused."""

import json
import os
import shutil

import numpy as np
import onnx
import pytest
from components import DEV_INSTALL, require_module
from onnx import numpy_helper

from mambadeploy.cli import main
from mambadeploy.export.manifest import sha256_file
from mambadeploy.models.presets import TINY_PRESETS
from mambadeploy.validate.output import check_schema

require_module("onnxruntime", DEV_INSTALL)


@pytest.fixture(scope="module", autouse=True)
def export_cache(tmp_path_factory):
    """One export cache for the session (the same one tests/export uses, so the suite exports each preset once)."""
    old = os.environ.get("MAMBADEPLOY_CACHE")
    os.environ["MAMBADEPLOY_CACHE"] = str(tmp_path_factory.getbasetemp() / "mambadeploy-cache")
    yield
    if old is None:
        os.environ.pop("MAMBADEPLOY_CACHE")
    else:
        os.environ["MAMBADEPLOY_CACHE"] = old


def _export_of(preset):
    from mambadeploy.runtime.ort_runner import export_for

    return export_for(preset, "fp32")


def _validate(tmp_path, *args):
    out = tmp_path / "r.json"
    rc = main(["validate", *args, "--json", str(out), "--quiet"])
    return rc, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_tiny_presets_pass_torch_and_ort_cpu(tmp_path, preset, capsys):
    rc, result = _validate(tmp_path, preset, "--backends", "torch,ort-cpu", "--new-tokens", "12", "--prompt-len", "7")
    print(capsys.readouterr().out)
    assert rc == 0 and result["passed"]
    check_schema(result)
    ort = {b["backend"]: b for b in result["backends"]}["ort-cpu"]
    assert ort["status"] == "passed" and ort["describe"]["provider"] == "CPUExecutionProvider"
    assert ort["logits"]["worst"]["max_rel"] <= 1e-4
    assert ort["greedy"]["token_match_rate"] == 1.0 and ort["greedy"]["first_divergence"] is None
    assert len(ort["logits"]["decode_steps"]) == 11


def _corrupt(src, dst, initializer: str, delta: float):
    """Copy an export and add `delta` to one expert's row of one weight in both graphs, then re-record the graphs'
    hashes in the manifest: an export that is self-consistent but wrong (as a buggy exporter would write it)."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    for graph in ("prefill", "decode"):
        path = dst / manifest["graphs"][graph]["file"]
        model = onnx.load(str(path))
        (init,) = [t for t in model.graph.initializer if t.name == initializer]
        array = numpy_helper.to_array(init).copy()
        array[0, 0] += np.float32(delta)
        init.CopyFrom(numpy_helper.from_array(array, init.name))
        onnx.save(model, str(path))
        manifest["graphs"][graph].update(sha256=sha256_file(path), bytes=path.stat().st_size)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_corrupted_export_fails_with_backend_and_layer_named(tmp_path, capsys):
    bad = _corrupt(_export_of("blackmamba-tiny"), tmp_path / "bad", "model.layers.1.ffn.w2", 0.5)
    rc, result = _validate(tmp_path, "blackmamba-tiny", "--export", str(bad), "--backends", "torch,ort-cpu",
                           "--new-tokens", "8", "--per-layer")
    printed = capsys.readouterr().out
    print(printed)
    assert rc == 1 and not result["passed"]
    check_schema(result)
    by = {b["backend"]: b for b in result["backends"]}
    assert by["torch"]["status"] == "passed"
    ort = by["ort-cpu"]
    assert ort["status"] == "failed" and any("logits max error" in f for f in ort["failures"])
    pl = ort["per_layer"]
    assert pl["first_bad_layer"] == 1 and pl["first_bad_kind"] == "moe"
    assert any("polygraphy" in m for m in pl["methods"])
    first = next(r for r in pl["tensors"] if r["name"] == pl["first_bad_tensor"])
    assert first["kind"] == "onnx" and first["layer"] == 1
    assert all(layer["ok"] for layer in pl["layers"] if layer["layer"] < 1)
    assert "ort-cpu:fp32: per-layer drift first leaves" in printed and "layer 1 (moe)" in printed


def test_export_of_another_model_is_refused(tmp_path, capsys):
    other = _export_of("moe-mamba-tiny")
    rc = main(["validate", "blackmamba-tiny", "--export", str(other), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "was made from another model than blackmamba-tiny" in err and "family" in err
    # same config, other weights: the embedding tells them apart
    other_weights = _corrupt(_export_of("blackmamba-tiny"), tmp_path / "ow", "model.embedding.weight", 1.0)
    rc = main(["validate", "blackmamba-tiny", "--export", str(other_weights), "--quiet"])
    assert rc == 2 and "made from other weights than blackmamba-tiny" in capsys.readouterr().err
    rc = main(["validate", str(other), "--quiet"])
    assert rc == 2 and "is an export directory" in capsys.readouterr().err
