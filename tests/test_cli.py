"""The CLI through mambadeploy.cli.main: inspect and generate, table and --json output, and a clean one-line `error:`
with exit code 2 for bad input."""

import json

import pytest
import torch

from mambadeploy.cli import main
from mambadeploy.models.loaders.blackmamba import save_blackmamba
from mambadeploy.runtime.generate import generate
from mambadeploy.runtime.torch_eager import TorchEagerRunner

pytestmark = pytest.mark.usefixtures("no_grad")


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- inspect
def test_inspect_table(capsys):
    code, out, _ = _run(capsys, "inspect", "blackmamba-tiny")
    assert code == 0
    for text in ("blackmamba", "M E M E", "parameters (total)", "active per token", "decode state per sequence"):
        assert text in out


def test_inspect_json_counts(capsys, tiny, preset):
    code, out, _ = _run(capsys, "inspect", preset, "--json")
    info = json.loads(out)
    model = tiny(preset)
    total, active = model.parameter_counts()
    assert code == 0 and (info["params_total"], info["params_active"]) == (total, active)
    assert info["layer_pattern"] == model.config.layer_pattern() and info["family"] == model.config.family
    state_bytes = sum(s.numel() * s.element_size() for s in model.prefill(torch.tensor([[1]]))[1].values())
    assert info["state_bytes_per_sequence"] == state_bytes


def test_inspect_full_size_preset_without_weights(capsys):
    code, out, _ = _run(capsys, "inspect", "blackmamba-2.8b", "--json", "--dtype", "bf16")
    info = json.loads(out)
    assert code == 0 and info["n_layers"] == 36 and info["weight_bytes"] == 2 * info["params_total"]
    assert 2.7e9 < info["params_total"] < 2.9e9 and 6.0e8 < info["params_active"] < 6.6e8  # 630M / 2.8B


def test_inspect_checkpoint_directory(capsys, tiny, tmp_path):
    save_blackmamba(tiny("blackmamba-tiny"), tmp_path)
    code, out, _ = _run(capsys, "inspect", str(tmp_path), "--json")
    info = json.loads(out)
    assert code == 0 and info["source"]["kind"] == "blackmamba" and info["layer_pattern"] == "M E M E"


def test_inspect_export_directory(capsys, tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "mambadeploy-export", "model": "x"}))
    code, out, _ = _run(capsys, "inspect", str(tmp_path), "--json")
    info = json.loads(out)
    assert code == 0 and info["kind"] == "export" and info["manifest"]["model"] == "x"


# --------------------------------------------------------------------------- generate
def test_generate_json_matches_api(capsys, tiny):
    code, out, _ = _run(capsys, "generate", "moe-mamba-tiny", "--prompt-ids", "1,2,3", "--prompt-ids", "7",
                        "--max-new-tokens", "6", "--json")
    assert code == 0
    data = json.loads(out)
    expected = generate(TorchEagerRunner(tiny("moe-mamba-tiny")), [[1, 2, 3], [7]], 6).tokens
    assert [p["tokens"] for p in data["prompts"]] == expected
    assert [p["prompt_ids"] for p in data["prompts"]] == [[1, 2, 3], [7]]
    assert data["timings"]["new_tokens"] == 12 and data["timings"]["decode_tokens_per_s"] > 0
    assert data["runner"]["backend"] == "torch"


def test_generate_text_output(capsys):
    code, out, _ = _run(capsys, "generate", "blackmamba-tiny", "--prompt-ids", "5,6", "--max-new-tokens", "4",
                        "--threads", "1")
    assert code == 0 and "[0] prompt 2 tokens -> 4 new:" in out and "tokens/s" in out


def test_generate_with_tokenizer(capsys, tokenizer_json, tiny):
    code, out, _ = _run(capsys, "generate", "jamba-tiny", "--prompt", "w1 w2 w3", "--tokenizer", tokenizer_json,
                        "--max-new-tokens", "5", "--json")
    assert code == 0
    row = json.loads(out)["prompts"][0]
    assert row["prompt_ids"] == [1, 2, 3]
    assert row["tokens"] == generate(TorchEagerRunner(tiny("jamba-tiny")), [[1, 2, 3]], 5).tokens[0]
    assert row["text"].split() == [f"w{t}" if t < 511 else "[UNK]" for t in row["tokens"]]


def test_generate_sampling_is_seeded(capsys):
    argv = ["generate", "blackmamba-tiny", "--prompt-ids", "1,2", "--max-new-tokens", "8", "--temperature", "1.0",
            "--top-k", "20", "--top-p", "0.9", "--json"]
    first = json.loads(_run(capsys, *argv, "--seed", "1")[1])["prompts"][0]["tokens"]
    again = json.loads(_run(capsys, *argv, "--seed", "1")[1])["prompts"][0]["tokens"]
    assert first == again


def test_generate_stop_ids(capsys, tiny):
    free = generate(TorchEagerRunner(tiny("blackmamba-tiny")), [[1, 2]], 10).tokens[0]
    _, out, _ = _run(capsys, "generate", "blackmamba-tiny", "--prompt-ids", "1,2", "--max-new-tokens", "10",
                     "--stop-ids", str(free[3]), "--json")
    assert json.loads(out)["prompts"][0]["tokens"] == free[: free.index(free[3]) + 1]


@pytest.mark.parametrize("argv, fragment", [
    (["generate", "blackmamba-tiny", "--prompt-ids", "1,2,999"], "outside the vocabulary"),
    (["generate", "blackmamba-tiny", "--prompt-ids", ""], "empty"),
    (["generate", "blackmamba-tiny", "--prompt-ids", "1,x"], "comma-separated integer"),
    (["generate", "blackmamba-tiny", "--prompt", "hello"], "--prompt needs --tokenizer"),
    (["generate", "blackmamba-tiny", "--prompt", "hi", "--tokenizer", "/nonexistent/tokenizer.json"], "cannot load tokenizer"),
    (["generate", "no-such-model", "--prompt-ids", "1"], "no such preset or directory"),
    (["generate", "jamba-tiny", "--prompt-ids", "1", "--max-new-tokens", "600"], "exceed the attention KV cache"),
    (["generate", "blackmamba-tiny", "--prompt-ids", "1", "--max-new-tokens", "0"], "max_new_tokens"),
    (["generate", "blackmamba-tiny", "--prompt-ids", "1", "--top-p", "0"], "top_p"),
    (["generate", "blackmamba-tiny", "--prompt-ids", "1", "--backend", "nope"], "unknown backend 'nope'"),
    (["generate", "blackmamba-tiny", "--prompt-ids", "1", "--threads", "0"], "--threads must be >= 1"),
    (["inspect", "no-such-model"], "no such preset or directory"),
])
def test_bad_input_is_one_error_line(capsys, argv, fragment):
    code, _, err = _run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err


def _engine_dir(tmp_path):
    """An engine directory's manifest as `mambadeploy build` writes it (the engines themselves are not needed here)."""
    from mambadeploy.trt import engine_dir as ed

    out = tmp_path / "eng"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({
        "format": ed.FORMAT, "format_version": ed.FORMAT_VERSION, "target": "trt", "trt": {"version": "10.6"},
        "gpu": "NVIDIA H200", "export_dir": "/x/exp", "export_manifest": {"family": "blackmamba", "dtype": "float16",
                                                                          "ops": "custom"},
        "limits": {"max_batch": 8}, "engines": {"decode": {"bytes": 10, "fingerprint": "f"}},
        "build_command": "mambadeploy build /x/exp --out eng --target trt"}))
    return out


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_engine_directory_is_not_taken_for_an_export(capsys, tmp_path, backend):
    """generate ENGINEDIR said "use --backend ort", and ORT then "not a mambadeploy export manifest": both now name the
    engine directory and --backend trt."""
    code, _, err = _run(capsys, "generate", str(_engine_dir(tmp_path)), "--backend", backend, "--prompt-ids", "1,2")
    assert code == 2 and "TensorRT engine directory" in err and "--backend trt" in err


def test_inspect_describes_an_engine_directory(capsys, tmp_path):
    code, out, _ = _run(capsys, "inspect", str(_engine_dir(tmp_path)), "--json")
    info = json.loads(out)
    assert code == 0 and info["kind"] == "engines" and info["gpu"] == "NVIDIA H200"
    assert info["engines"]["decode"]["bytes"] == 10 and "--backend trt" in info["run_with"]
    code, out, _ = _run(capsys, "inspect", str(tmp_path / "eng"))  # the table
    assert code == 0 and "TensorRT engine directory" in out


def test_help_is_whole_sentences(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "mambadeploy COMMAND --help" in out


def test_stop_ids_outside_the_vocabulary_are_refused(capsys):
    code, _, err = _run(capsys, "generate", "blackmamba-tiny", "--prompt-ids", "1,2", "--stop-ids", "3,99999")
    assert code == 2 and "stop id(s) [99999] outside the vocabulary" in err


def test_validate_takes_ort_as_a_backend_name():
    from mambadeploy.validate.backends import parse_backends

    (req,), chosen = parse_backends("ort:fp32", "fp32")
    assert chosen and req.name == ("ort-cuda" if torch.cuda.is_available() else "ort-cpu")


def test_saved_checkpoint_files_get_the_umask_mode(tiny, tmp_path):
    import os
    import stat

    from mambadeploy import save_model

    old = os.umask(0o022)
    try:
        save_model(tiny("blackmamba-tiny"), tmp_path / "m")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "m").iterdir()}
    assert modes == {"model.safetensors": 0o644, "mambadeploy.json": 0o644}
