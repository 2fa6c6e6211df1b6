"""The TensorRT runner's checks that come before TensorRT: engine directory, manifest, checksums, compatibility. The
engine execution itself cannot run on these machines (no full TensorRT; TensorRT-RTX refuses the H100)."""

from __future__ import annotations

import json

import pytest
import torch

from mambadeploy.errors import MambaDeployError
from mambadeploy.trt import engine_dir as ed
from mambadeploy.trt import fingerprint as fp


def _engine_dir(tmp_path):
    d = tmp_path / "engines"
    d.mkdir()
    built = fp.describe("g" * 64, {"SelectiveScan": 1}, {"target": "trt", "version": "10.8.0"}, "NVIDIA L4 sm_89",
                        {"precision": "fp16", "profile": {}})
    manifest = {"format": ed.FORMAT, "format_version": ed.FORMAT_VERSION, "target": "trt", "engines": {},
                "build_command": "mambadeploy build exp --out engines", "export_manifest": {}}
    for g in ed.GRAPHS:
        ed.atomic_write_bytes(ed.engine_path(d, g), b"plan-bytes-" + g.encode())
        manifest["engines"][g] = {"bytes": ed.engine_path(d, g).stat().st_size,
                                  "sha256": fp.file_sha256(ed.engine_path(d, g)), "built_from": built,
                                  "fingerprint": fp.fingerprint(**built)}
    ed.write_manifest(d, manifest)
    return d, manifest, built


def test_runner_module_imports_without_tensorrt():
    import mambadeploy.runtime.trt_runner as r

    assert r.TrtRunner.backend == "trt"


def test_not_an_engine_dir_and_bad_manifests(tmp_path):
    with pytest.raises(MambaDeployError, match="not an engine directory .* mambadeploy build"):
        ed.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(MambaDeployError, match="not valid JSON"):
        ed.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "mambadeploy-export"}))
    with pytest.raises(MambaDeployError, match="not a mambadeploy engine manifest"):
        ed.read_manifest(tmp_path)


def test_corrupt_or_missing_engine_names_the_fix(tmp_path):
    d, manifest, _ = _engine_dir(tmp_path)
    assert ed.load_engine_bytes(d, manifest, "prefill") == b"plan-bytes-prefill"
    ed.engine_path(d, "prefill").write_bytes(b"plan-bytes-prefilX")
    with pytest.raises(MambaDeployError, match="corrupt .* rebuild with: mambadeploy build exp --out engines --force"):
        ed.load_engine_bytes(d, manifest, "prefill")
    ed.engine_path(d, "decode").unlink()
    with pytest.raises(MambaDeployError, match="decode.engine is missing"):
        ed.load_engine_bytes(d, manifest, "decode")


def test_engine_for_another_gpu_or_trt_version_is_refused(tmp_path):
    _, manifest, built = _engine_dir(tmp_path)
    ed.check_compatible(manifest, "decode", dict(built))
    with pytest.raises(MambaDeployError, match=r"the GPU changed: built with .*L4.*now .*H100.*rebuild it here with"):
        ed.check_compatible(manifest, "decode", dict(built, gpu="NVIDIA H100 sm_90"))
    with pytest.raises(MambaDeployError, match="the TensorRT version changed"):
        ed.check_compatible(manifest, "decode", dict(built, trt={"target": "trt", "version": "10.9.0"}))
    with pytest.raises(MambaDeployError, match="plugin versions"):
        ed.check_compatible(manifest, "decode", dict(built, plugins={"SelectiveScan": 2}))


def test_factory_knows_trt_and_wants_a_gpu():
    from mambadeploy.runtime.factory import BACKENDS, make_runner

    assert "trt" in BACKENDS
    with pytest.raises(MambaDeployError, match="CUDA GPU"):
        make_runner("anything", backend="trt", device="cpu")


class _FakeEngine:
    """Just enough of a TensorRT ICudaEngine for the runner's buffer sets: the decode graph's I/O names and shapes."""

    def __init__(self, names, shapes):
        self.names, self.shapes, self.num_io_tensors = names, shapes, len(names)

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return "input" if name.startswith("past.") or name == "input_ids" else "output"

    def get_tensor_shape(self, name):
        return self.shapes[name]

    def get_tensor_dtype(self, name):
        return "DataType.FLOAT"


def test_custom_export_kv_caches_are_one_buffer_in_both_state_sets():
    """An engine from a `--ops custom` export (DecodeAttention declares present aliasing past) keeps each KV cache in
    ONE buffer shared by both ping-pong sets, so a step writes one slot in place; the other states alternate; a
    portable export's engine shares nothing."""
    from types import SimpleNamespace

    from mambadeploy.models.checkpoint import load_model
    from mambadeploy.models.state import state_specs
    from mambadeploy.runtime import trt_runner

    config = load_model("jamba-tiny").config
    specs = state_specs(config, torch.float32)
    names = ["input_ids"] + ["past." + s.name for s in specs] + ["logits"] + ["present." + s.name for s in specs]
    shapes = {"present." + s.name: (-1, *s.concrete_shape(1)[1:]) for s in specs}
    assert trt_runner.aliased_states({"ops": "portable"}, config) == set()
    aliased = trt_runner.aliased_states({"ops": "custom"}, config)
    kv = {s.name for s in specs if s.name.endswith((".key", ".value"))}
    assert aliased == kv and kv
    runner = trt_runner.TrtRunner.__new__(trt_runner.TrtRunner)
    runner.engines = {"decode": _FakeEngine(names, shapes)}
    runner.trt = SimpleNamespace(TensorIOMode=SimpleNamespace(INPUT="input"))
    runner.device, runner._buffers, runner.aliased_states = torch.device("cpu"), {}, aliased
    set0, set1 = runner._state_set(3, 0, prefix=""), runner._state_set(3, 1, prefix="")
    for name in set0:
        assert set0[name].shape[0] == 3
        assert (set0[name].data_ptr() == set1[name].data_ptr()) == (name in kv), name
