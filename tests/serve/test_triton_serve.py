"""A real tritonserver (from nvidia-pytriton), started once for this module by `mambadeploy serve` on loopback,
serving blackmamba-tiny and jamba-tiny through the in-flight-batching Python model, plus the implicit-state decode
config (its Python-backend twin: the bundled server has no onnxruntime backend). The last test stops it with SIGTERM."""

from __future__ import annotations

import importlib.util
import json
import random
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from components import DEV_INSTALL, require, require_module

require(importlib.util.find_spec("pytriton") is not None, "nvidia-pytriton",
        "pip install nvidia-pytriton==0.7.0 --no-deps")
require_module("tritonclient.grpc", DEV_INSTALL)

from mambadeploy.errors import InputError
from mambadeploy.runtime.factory import make_runner
from mambadeploy.runtime.generate import generate
from mambadeploy.serve.client import run_streams
from mambadeploy.serve.repo import read_config, write_loadable_twin, write_repo, write_state_model
from mambadeploy.serve.server import ServeError, TritonServer, free_port, http_ready

MODELS = {"bm": "blackmamba-tiny", "jt": "jamba-tiny"}
INTERVAL_MS = 30  # the "bmi" model (blackmamba-tiny): at most one response per stream per 30 ms
MAX_BATCH = 16
NUMPY_1 = int(np.__version__.split(".")[0]) < 2  # strings need numpy < 2 in the server's stub (serve/repo.py)


@pytest.fixture(scope="module")
def exported():
    from mambadeploy.runtime.ort_runner import export_for

    return export_for("blackmamba-tiny", dtype="fp32", ops="portable")  # cached across the test session


@pytest.fixture(scope="module")
def server(tmp_path_factory, exported, tokenizer_json):
    repo = tmp_path_factory.mktemp("repo")
    for name, preset in MODELS.items():
        write_repo(preset, repo, name=name, backend="torch", dtype="fp32", device="cpu", max_batch=MAX_BATCH,
                   threads=1, tokenizer=tokenizer_json if name == "bm" and NUMPY_1 else None)
    write_repo("blackmamba-tiny", repo, name="bmi", backend="torch", dtype="fp32", device="cpu", max_batch=4,
               threads=1, response_interval_ms=INTERVAL_MS)
    state_dir = write_state_model(exported, tmp_path_factory.mktemp("state"), "bm_decode", MAX_BATCH)
    write_loadable_twin(state_dir, repo)
    engine_state_dir = write_state_model(_engine_dir(tmp_path_factory.mktemp("engines"), exported),
                                         tmp_path_factory.mktemp("state"), "bm_engine", MAX_BATCH)
    write_loadable_twin(engine_state_dir, repo)
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    process = subprocess.Popen([sys.executable, "-m", "mambadeploy.cli", "serve", str(repo), "--http-port",
                                str(ports["http"]), "--grpc-port", str(ports["grpc"]), "--metrics-port",
                                str(ports["metrics"])], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    info = {"process": process, "ports": ports, "state_dir": state_dir, "engine_state_dir": engine_state_dir,
            "repo": repo,
            "grpc": f"127.0.0.1:{ports['grpc']}", "http": f"http://127.0.0.1:{ports['http']}"}
    try:  # SIGTERM to the CLI stops its server too (a SIGKILL would orphan it)
        deadline = time.monotonic() + 150
        while not http_ready(info["http"]):
            if process.poll() is not None or time.monotonic() > deadline:
                _stop(process)
                pytest.fail(f"mambadeploy serve did not become ready: {process.stdout.read()}")
            time.sleep(0.2)
        yield info
    finally:
        _stop(process)


def _stop(process):
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(20)


def _engine_dir(directory, exported):
    """An engine directory as `mambadeploy build` lays it out (its manifest carries the export's), with a stand-in
    decode.engine: TensorRT cannot be installed here, and the config only names the file."""
    from mambadeploy.trt.engine_dir import FORMAT, FORMAT_VERSION, write_manifest

    export_manifest = json.loads((Path(exported) / "manifest.json").read_text())
    write_manifest(directory, {"format": FORMAT, "format_version": FORMAT_VERSION, "export_manifest": export_manifest})
    (directory / "decode.engine").write_bytes(b"not a real plan")
    return directory


def _alone(tiny, preset, prompt, n):
    return generate(make_runner(tiny(preset), "torch"), [prompt], n).tokens[0]


def _prompts(seed, count, vocab=512):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(1, 9))] for _ in range(count)]


def _metric(server, line_start) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server['ports']['metrics']}/metrics").read().decode()
    values = [float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(line_start)]
    assert values, f"no metric {line_start}"
    return values[0]


@pytest.mark.parametrize("name", list(MODELS))
def test_16_concurrent_streams_match_generate_alone(server, tiny, name):
    prompts = _prompts(len(name), 16)
    results = run_streams(server["grpc"], name, [{"prompt": p, "max_tokens": 10} for p in prompts])
    for prompt, result in zip(prompts, results):
        assert result.error is None
        assert result.tokens == _alone(tiny, MODELS[name], prompt, 10)
        assert len(result.latency_ms) == 10 and all(v > 0 for v in result.latency_ms)


def test_response_interval_gathers_tokens(server, tiny):
    """Tokens of one stream gather between responses (output_ids [k]) and still arrive complete and in order."""
    prompts = _prompts(11, 3)
    results = run_streams(server["grpc"], "bmi", [{"prompt": p, "max_tokens": 24} for p in prompts])
    for prompt, result in zip(prompts, results):
        print("responses", result.responses, "for", len(result.tokens), "tokens")
        assert result.error is None and result.tokens == _alone(tiny, "blackmamba-tiny", prompt, 24)
        assert result.responses < len(result.tokens)  # a CPU step of this model is far below 30 ms


def test_profile_counters(server):
    """The model's profile counters (what serve_bench's breakdown reads) count the work streamed so far."""
    from mambadeploy.serve.profile import breakdown, read_profile

    url = f"http://127.0.0.1:{server['ports']['metrics']}"
    deadline = time.monotonic() + 5
    while not (profile := read_profile(url, "bm")).get("responses") and time.monotonic() < deadline:
        time.sleep(0.1)  # pushed by the watcher every 50 ms
    print(profile)
    assert profile["steps"] > 0 and profile["step_rows"] >= profile["steps"]
    assert profile["tokens"] >= profile["responses"] > 0 and profile["admitted"] >= 16
    assert 0 < profile["step_s"] < profile["busy_s"] and profile["send_s"] > 0
    parts = breakdown({}, profile, wall_s=1.0)
    assert parts["mean_batch"] >= 1 and parts["tokens_per_response"] >= 1 and parts["step_ms"] > 0


def test_disconnected_client_frees_its_slot(server, tiny):
    before = _metric(server, 'mambadeploy_cancelled_total{model="bm"}')
    prompts = _prompts(7, 4)
    jobs = [{"prompt": prompts[0], "max_tokens": 100_000, "cancel_after": 3}]  # would hold its slot for minutes
    jobs += [{"prompt": p, "max_tokens": 12} for p in prompts[1:]]
    results = run_streams(server["grpc"], "bm", jobs)
    assert results[0].cancelled and len(results[0].tokens) >= 3
    for prompt, result in zip(prompts[1:], results[1:]):
        assert result.error is None and result.tokens == _alone(tiny, "blackmamba-tiny", prompt, 12)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _metric(server, 'mambadeploy_live_sequences{model="bm"}') == 0 and \
                _metric(server, 'mambadeploy_cancelled_total{model="bm"}') > before:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the cancelled sequence still holds its slot")


def test_bad_requests_fail_alone(server, tiny):
    good = _prompts(3, 4)
    bad = [{"prompt": [1, 99999], "max_tokens": 4},
           {"prompt": [], "max_tokens": 4},
           {"prompt": [1] * 10, "max_tokens": 600},  # jamba-tiny's KV cache holds 512
           {"prompt": [1, 2], "max_tokens": 2.5, "types": {"max_tokens": "float32"}},
           {"max_tokens": 4}]
    expected = ["outside the vocabulary", "empty prompt", "KV cache", "data-type", "no prompt"]
    results = run_streams(server["grpc"], "jt", [{"prompt": p, "max_tokens": 8} for p in good] + bad)
    for prompt, result in zip(good, results):
        assert result.error is None and result.tokens == _alone(tiny, "jamba-tiny", prompt, 8)
    for result, phrase in zip(results[len(good):], expected):
        print(result.error)
        assert result.tokens == [] and phrase in result.error


def test_generate_extension(server, tiny):
    prompt = [5, 2, 3]
    want = _alone(tiny, "blackmamba-tiny", prompt, 5)
    body = json.dumps({"input_ids": prompt, "max_tokens": 5, "stream": False}).encode()
    whole = json.loads(urllib.request.urlopen(f"{server['http']}/v2/models/bm/generate", body).read())
    assert whole["output_ids"] == want and whole["index"] == list(range(5))
    body = json.dumps({"input_ids": prompt, "max_tokens": 5}).encode()
    events = urllib.request.urlopen(f"{server['http']}/v2/models/bm/generate_stream", body).read().decode()
    tokens = []
    for line in events.splitlines():  # an event carries every token ready: one (a scalar in Triton's JSON) or a list
        if line.startswith("data:"):
            ids = json.loads(line[5:])["output_ids"]
            tokens += ids if isinstance(ids, list) else [ids]
    assert tokens == want


def test_text_prompt(server, tiny, tokenizer_json, tmp_path):
    """Under numpy < 2 text goes through the repository's tokenizer; under numpy 2 (the stub would die on a string
    tensor) serve-repo refuses --tokenizer, and Triton itself refuses text_input to a repository without one."""
    result = run_streams(server["grpc"], "bm", [{"text": "w5 w2 w3", "max_tokens": 4}])[0]
    if NUMPY_1:
        assert result.error is None and result.tokens == _alone(tiny, "blackmamba-tiny", [5, 2, 3], 4)
        return
    assert result.tokens == [] and "text_input" in result.error
    with pytest.raises(InputError, match="numpy"):
        write_repo("blackmamba-tiny", tmp_path, tokenizer=tokenizer_json)
    after = run_streams(server["grpc"], "bm", [{"prompt": [5, 2, 3], "max_tokens": 4}])[0]
    assert after.error is None and after.tokens == _alone(tiny, "blackmamba-tiny", [5, 2, 3], 4)  # model alive


def test_latency_metrics(server):
    assert _metric(server, 'mambadeploy_time_to_first_token_seconds_count{model="bm"}') >= 16
    assert _metric(server, 'mambadeploy_inter_token_latency_seconds_count{model="bm"}') >= 16  # one per sequence
    assert _metric(server, 'mambadeploy_generated_tokens_total{model="jt"}') >= 16 * 10


def test_implicit_state_config_parses_and_loads(server, exported):
    import numpy as np
    import onnxruntime as ort

    from mambadeploy.export.manifest import Manifest

    config = read_config(server["state_dir"] / "config.pbtxt")
    names = [s.name for s in Manifest.read(exported).state]
    assert config.backend == "onnxruntime" and config.max_batch_size == MAX_BATCH
    assert [s.input_name for s in config.sequence_batching.state] == [f"past.{n}" for n in names]
    assert [s.output_name for s in config.sequence_batching.state] == [f"present.{n}" for n in names]
    assert [c.name for c in config.sequence_batching.control_input] == ["START", "READY", "CORRID"]
    index = json.loads(urllib.request.urlopen(urllib.request.Request(f"{server['http']}/v2/repository/index",
                                                                     b"{}")).read())
    assert {"name": "bm_decode_twin", "version": "1", "state": "READY"} in index
    assert {"name": "bm_engine_twin", "version": "1", "state": "READY"} in index
    engine_config = read_config(server["engine_state_dir"] / "config.pbtxt")
    assert engine_config.backend == "tensorrt"
    assert [s.input_name for s in engine_config.sequence_batching.state] == [f"past.{n}" for n in names]
    assert (server["engine_state_dir"] / "1" / "model.plan").resolve().name == "decode.engine"
    # the graph Triton would run: the export's decode plus the control inputs, same outputs
    original = ort.InferenceSession(str(Path(exported) / "decode.onnx"))
    edited = ort.InferenceSession(str(server["state_dir"] / "1" / "model.onnx"))
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.standard_normal([3 if d == "batch" else d for d in i.shape]).astype(np.float32)
             for i in original.get_inputs() if i.name != "input_ids"}
    feeds["input_ids"] = np.array([[1], [2], [3]], dtype=np.int64)
    controls = {"START": np.ones((3, 1), np.float32), "READY": np.ones((3, 1), np.float32),
                "CORRID": np.arange(3, dtype=np.uint64)[:, None]}
    for a, b in zip(original.run(None, feeds), edited.run(None, {**feeds, **controls})):
        assert np.array_equal(a, b)


def test_start_failure_names_the_reason(tmp_path, server):
    """The bundled server has no onnxruntime backend: loading the real implicit-state model fails, with the reason."""
    import shutil

    shutil.copytree(server["state_dir"], tmp_path / "bm_decode")
    failing = TritonServer(tmp_path, free_port(), free_port(), free_port())
    with pytest.raises(ServeError, match="backend 'onnxruntime'") as error:
        failing.start(60)
    assert str(failing.log_path) in str(error.value) and failing.log_path.is_file()  # kept for the user to read
    assert not failing.shm_regions()
    failing.cleanup_workdir()


def test_sigterm_stops_within_10s_without_shared_memory(server):
    process = server["process"]
    regions = sorted(Path("/dev/shm").glob(f"mambadeploy_{process.pid}_*"))
    assert regions, "the server's Python backend regions should exist while it runs"
    t0 = time.monotonic()
    process.send_signal(signal.SIGTERM)
    process.wait(15)
    elapsed = time.monotonic() - t0
    print(f"stopped in {elapsed:.1f} s, exit code {process.returncode}")
    assert elapsed < 10
    assert not [r for r in regions if r.exists()]
    assert not http_ready(server["http"])
