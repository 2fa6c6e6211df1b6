"""The CLI round trip: `export` a checkpoint, `inspect` the export directory, `generate --backend ort` from it (same
tokens as the torch backend on the checkpoint), and one-line errors with exit code 2."""

import json
import os

import pytest
from components import DEV_INSTALL, require_module

from mambadeploy import save_model
from mambadeploy.cli import main
from mambadeploy.models.checkpoint import empty_model
from mambadeploy.models.config import LayerSpec, MambaConfig, ModelConfig, MoEConfig
from mambadeploy.models.model import init_random_

require_module("onnxruntime", DEV_INSTALL)


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = ModelConfig(family="moe-mamba", vocab_size=128, d_model=32,
                         layers=[LayerSpec("mamba", "none"), LayerSpec("none", "moe")],
                         mamba=MambaConfig(d_inner=64, d_state=8), final_norm="rmsnorm",
                         moe=MoEConfig(n_experts=4, ffn_size=48, top_k=1, router="softmax_topk", activation="silu"))
    path = tmp_path_factory.mktemp("ckpt")
    save_model(init_random_(empty_model(config), seed=3).eval(), path)
    return path


def test_export_inspect_generate(capsys, checkpoint, tmp_path):
    out = tmp_path / "export"
    code, stdout, err = _run(capsys, "export", checkpoint, "--out", out, "--max-batch", 4, "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert set(summary["files"]) == {"manifest.json", "prefill.onnx", "decode.onnx"}
    assert summary["limits"] == {"max_batch": 4, "max_length": None} and summary["ops"] == "portable"
    assert "tracing prefill" in err and "tracing decode" in err, "progress messages go to stderr"

    code, stdout, _ = _run(capsys, "inspect", out, "--json")
    info = json.loads(stdout)
    assert code == 0 and info["kind"] == "onnx-export" and info["family"] == "moe-mamba"
    assert [t["name"] for t in info["graphs"]["decode"]["inputs"]][:2] == ["input_ids", "past.L0.conv"]
    code, stdout, _ = _run(capsys, "inspect", out)
    assert code == 0 and "ONNX export directory" in stdout

    gen = ["--prompt-ids", "1,2,3,4,5", "--prompt-ids", "9", "--max-new-tokens", 12, "--json"]
    code, stdout, err = _run(capsys, "generate", out, "--backend", "ort", "--provider", "cpu", *gen)
    assert code == 0, err
    ort_run = json.loads(stdout)
    code, stdout, _ = _run(capsys, "generate", checkpoint, *gen)
    torch_run = json.loads(stdout)
    assert ort_run["runner"]["backend"] == "ort-cpu"
    assert [p["tokens"] for p in ort_run["prompts"]] == [p["tokens"] for p in torch_run["prompts"]]

    code, _, err = _run(capsys, "generate", out, "--backend", "ort", "--prompt-ids", "1,2,3,4,5", "--prompt-ids", "1",
                        "--prompt-ids", "2", "--prompt-ids", "3", "--prompt-ids", "4")
    assert code == 2 and "batch of 5 exceeds the export's max batch 4" in err

    code, _, err = _run(capsys, "export", checkpoint, "--out", out)
    assert code == 2 and err.strip().startswith("error:") and "already holds an export; pass --force" in err


def test_export_bad_checkpoint(capsys, tmp_path):
    code, _, err = _run(capsys, "export", tmp_path / "nope", "--out", tmp_path / "x")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error:") and not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- interruption
def _start_export(out):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "mambadeploy.cli", "export", "blackmamba-tiny", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_signal_mid_export_leaves_no_directory_behind(tmp_path, signame):
    """A user's `kill` of an export left a hidden 423 MB .OUT.partial-XXXX directory, and Ctrl-C took ~18 s: now both
    remove it at once and exit with 128 + the signal number."""
    import signal
    import time

    out = tmp_path / "exp"
    proc = _start_export(out)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".exp.partial-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob(".exp.partial-*")), "the export never started writing"
    time.sleep(0.5)
    t0 = time.time()
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=30)
    print(f"exit {proc.returncode} after {time.time() - t0:.2f} s; stderr: {err[-300:]}")
    assert proc.returncode == 128 + getattr(signal, signame)
    assert time.time() - t0 < 5
    assert not list(tmp_path.iterdir()), f"left behind: {list(tmp_path.iterdir())}"


def test_a_stale_partial_directory_is_swept(tmp_path):
    """A partial directory of a process that no longer runs (kill -9) is removed by the next export, with a message."""
    from mambadeploy.export.exporter import sweep_stale_partials

    gone = tmp_path / ".exp.partial-999999999-abcd"
    mine = tmp_path / f".exp.partial-{os.getpid()}-efgh"
    gone.mkdir()
    mine.mkdir()
    said = []
    sweep_stale_partials(tmp_path / "exp", said.append)
    assert not gone.exists() and mine.exists() and "interrupted export" in said[0]
