"""SCAP sparse checkpoints through the CLI and the ONNX export: `mambadeploy calibrate` writes a checkpoint that
inspect / export take; the exported decode graph holds the masking as standard ops and ORT CPU matches the sparse
reference within the measured fp32 bound of the logit scale over prefill and decode steps."""

import json
from collections import Counter

import onnx
import pytest
import torch
from components import DEV_INSTALL, require_module

from mambadeploy.cli import main
from mambadeploy.export.exporter import export_model
from mambadeploy.models.calibrate import calibrate, windows_from_tokens
from mambadeploy.models.checkpoint import load_model
from mambadeploy.models.sparsity import sites
from mambadeploy.validate.tolerances import assert_logits_close

require_module("onnxruntime", DEV_INSTALL)


@pytest.mark.parametrize("preset", ["jamba-tiny"])  # Mamba, attention, MLP and top-2 MoE sites in one model
def test_sparse_export_matches_the_sparse_reference_on_ort_cpu(tmp_path, preset):
    from mambadeploy.runtime.ort_runner import OrtRunner

    dense = load_model(preset)
    tokens = torch.randint(0, 512, (3000,), generator=torch.Generator().manual_seed(0))
    sparse = calibrate(dense, windows_from_tokens(tokens, 4, 32), 0.5, mode="median")
    export_model(sparse, tmp_path / "x", ops="portable", force=True)
    ops = Counter(n.op_type for n in onnx.load(tmp_path / "x" / "decode.onnx", load_external_data=False).graph.node)
    n_masks = len(sites(sparse.config))
    assert ops["Abs"] >= n_masks and ops["Where"] >= n_masks  # |x - m| > t, written with standard ops
    runner = OrtRunner(tmp_path / "x")
    ids = torch.randint(0, 512, (3, 7), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([7, 4, 6])
    ref, state = sparse.prefill(ids, lengths)
    got, ort_state = runner.prefill(ids, lengths)
    assert_logits_close(torch.as_tensor(got), ref, what=f"{preset} sparse prefill ORT vs reference",
                        check="ort_portable")
    for step in range(6):  # a fixed token sequence: the reference's greedy picks
        token = ref.argmax(-1)
        ref, state = sparse.step(token, state)
        got, ort_state = runner.step(token, ort_state)
        assert_logits_close(torch.as_tensor(got), ref, what=f"{preset} sparse decode step {step}", check="ort_portable")


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_calibrate_cli_writes_a_checkpoint_inspect_shows(tmp_path, capsys):
    data = _write(tmp_path / "calib.txt", "def f(x):\n    return x * 2\n" * 40)
    out = tmp_path / "sparse"
    rc = main(["calibrate", "blackmamba-small-trained", "--data", data, "--sparsity", "0.5", "--samples", "4",
               "--seq-len", "64", "--mode", "median", "--out", str(out), "--json"])
    assert rc == 0
    config = json.loads(capsys.readouterr().out)
    assert config["target"] == 0.5 and len(config["sites"]) == 10  # 2 Mamba x 3 + 2 MoE x 2
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    first = info["sparsity"]["sites"]["L0.in_proj"]
    assert first["mode_kind"] == "median" and first["threshold"] > 0 and first["target"] == 0.5
    model = load_model(out)
    assert model.layers[0].mixer.sparse["in_proj"].threshold == first["threshold"]
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "def f(", "--tokenizer", "bytes", "--max-new-tokens", "4",
                 "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["prompts"][0]
    assert row["prompt_ids"] == list(b"def f(") and len(row["tokens"]) == 4 and isinstance(row["text"], str)


@pytest.mark.parametrize("extra, message", [
    (["--sparsity", "1.0"], r"--sparsity must be in \[0, 1\)"),
    (["--sparsity", "-0.1"], r"--sparsity must be in \[0, 1\)"),
    (["--layers", "in_proj,ffn"], "unknown layer name"),
    (["--data", "EMPTY"], "is empty"),
    (["--tokenizer", "BIG"], "does not match"),
    (["--model", "blackmamba-tiny"], "give --tokenizer"),
])
def test_calibrate_bad_input_is_one_line(tmp_path, capsys, extra, message):
    data = _write(tmp_path / "calib.txt", "import os\n" * 50)
    model = "blackmamba-small-trained"
    if "--model" in extra:
        model, extra = extra[1], []
    if extra[:2] == ["--data", "EMPTY"]:
        extra = ["--data", _write(tmp_path / "empty.txt", "")]
    if extra[:2] == ["--tokenizer", "BIG"]:
        from tokenizers import Tokenizer, models

        tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(300)}, unk_token="w0"))
        tok.save(str(tmp_path / "tokenizer.json"))
        extra = ["--tokenizer", str(tmp_path / "tokenizer.json")]
    args = ["calibrate", model, "--data", data, "--out", str(tmp_path / "o"), "--samples", "2", "--seq-len", "16"]
    rc = main(args + extra)
    err = capsys.readouterr().err
    print(err)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error:")
    assert __import__("re").search(message, err)
