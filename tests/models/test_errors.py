"""Bad checkpoints and bad input end in one MambaDeployError naming the cause (never a deep traceback)."""

import json
import os
import random

import pytest
import torch
from components import DEV_INSTALL, require_module
from safetensors.torch import load_file, save_file

from mambadeploy import load_model, save_model
from mambadeploy.errors import CheckpointError, InputError
from mambadeploy.models.loaders.blackmamba import save_blackmamba
from mambadeploy.runtime.generate import generate
from mambadeploy.runtime.torch_eager import TorchEagerRunner

pytestmark = pytest.mark.usefixtures("no_grad")


@pytest.fixture
def blackmamba_dir(tiny, tmp_path):
    save_blackmamba(tiny("blackmamba-tiny"), tmp_path)
    return tmp_path


def _assert_all_named(message, *names):
    for name in names:
        assert name in message, f"{name!r} not named in: {message}"


def test_blackmamba_key_problems_listed_at_once(blackmamba_dir):
    path = blackmamba_dir / "pytorch_model.bin"
    sd = torch.load(path, weights_only=True)["model"]
    del sd["decoder.layers.0.mixer.D"]
    del sd["decoder.layers.3.mixer.local_experts.2.linear_fc2.weight"]
    sd["decoder.layers.0.mixer.extra_thing"] = torch.zeros(3)
    sd["decoder.layers.2.mixer.x_proj.weight"] = torch.zeros(5, 5)
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError) as info:
        load_model(blackmamba_dir)
    msg = str(info.value)
    _assert_all_named(msg, "missing keys (2)", "decoder.layers.0.mixer.D",
                      "decoder.layers.3.mixer.local_experts.2.linear_fc2.weight",
                      "unexpected keys (1)", "decoder.layers.0.mixer.extra_thing",
                      "mis-shaped keys (1)", "decoder.layers.2.mixer.x_proj.weight: checkpoint (5, 5)")


def test_hf_key_problems_listed_at_once(tmp_path):
    """A tiny HF Jamba file written by transformers, then damaged."""
    require_module("transformers", DEV_INSTALL)
    import transformers

    cfg = transformers.JambaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, attn_layer_period=2,
                                   attn_layer_offset=1, num_experts=2, num_experts_per_tok=1, mamba_dt_rank=2)
    transformers.JambaForCausalLM(cfg).save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.1.feed_forward.experts.1.up_proj.weight"]
    sd["model.layers.0.mamba.mystery"] = torch.zeros(2)
    sd["model.final_layernorm.weight"] = torch.zeros(17)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path)
    _assert_all_named(str(info.value), "model.layers.1.feed_forward.experts.1.up_proj.weight",
                      "model.layers.0.mamba.mystery", "model.final_layernorm.weight: checkpoint (17,) vs expected (16,)")


def test_native_key_problems_listed_at_once(tiny, tmp_path):
    save_model(tiny("moe-mamba-tiny"), tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["final_norm.weight"]
    sd["bogus"] = torch.zeros(1)
    sd["embedding.weight"] = sd["embedding.weight"][:10]
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path)
    _assert_all_named(str(info.value), "final_norm.weight", "bogus", "embedding.weight: checkpoint (10, 64)")


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match="unknown model_type 'llama'"):
        load_model(tmp_path)


def test_unknown_preset_or_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such preset or directory"):
        load_model(str(tmp_path / "nope"))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_blackmamba_bin(blackmamba_dir, damage):
    path = blackmamba_dir / "pytorch_model.bin"
    raw = path.read_bytes()
    path.write_bytes({"truncated": raw[: len(raw) // 2], "garbage": os.urandom(4096), "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="truncated or corrupt weight file"):
        load_model(blackmamba_dir)


def test_random_bytes_never_escape_as_a_raw_exception(blackmamba_dir):
    """Random files of several sizes (seeded): every one ends in the CheckpointError, never in an unpickler's own
    IndexError / KeyError / struct.error (an os.urandom file once did)."""
    path = blackmamba_dir / "pytorch_model.bin"
    rng = random.Random(0)
    for size in (1, 2, 3, 7, 64, 4096) * 8:
        path.write_bytes(bytes(rng.getrandbits(8) for _ in range(size)))
        with pytest.raises(CheckpointError, match="truncated or corrupt weight file|holds objects other than tensors"):
            load_model(blackmamba_dir)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors(tiny, tmp_path, damage):
    save_model(tiny("blackmamba-tiny"), tmp_path)
    path = tmp_path / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 1000] if damage == "truncated" else os.urandom(4096))
    with pytest.raises(CheckpointError, match="truncated or corrupt safetensors"):
        load_model(tmp_path)


def test_corrupt_hf_safetensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "vocab_size": 16, "hidden_size": 8,
                                                      "num_hidden_layers": 1}))
    (tmp_path / "model.safetensors").write_bytes(os.urandom(2048))
    with pytest.raises(CheckpointError, match="truncated or corrupt safetensors"):
        load_model(tmp_path)


def test_missing_weight_file(blackmamba_dir):
    (blackmamba_dir / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="pytorch_model.bin is missing"):
        load_model(blackmamba_dir)


def test_bin_with_pickled_objects_is_refused(blackmamba_dir):
    path = blackmamba_dir / "pytorch_model.bin"
    sd = torch.load(path, weights_only=True)["model"]
    torch.save({"model": sd, "args": object()}, path)
    with pytest.raises(CheckpointError, match="objects other than tensors"):
        load_model(blackmamba_dir)


# --------------------------------------------------------------------------- bad input
def test_token_outside_vocabulary(tiny):
    model = tiny("blackmamba-tiny")
    with pytest.raises(InputError, match=r"\[512\] outside the vocabulary \[0, 512\)"):
        model(torch.tensor([[1, 512]]))
    _, state = model.prefill(torch.tensor([[1, 2]]))
    with pytest.raises(InputError, match="outside the vocabulary"):
        model.step(torch.tensor([-1]), state)
    with pytest.raises(InputError, match="outside the vocabulary"):
        generate(TorchEagerRunner(model), [[1, 2, 9999]], 4)


def test_empty_prompt(tiny):
    model = tiny("moe-mamba-tiny")
    with pytest.raises(InputError, match="empty prompt"):
        model(torch.zeros(1, 0, dtype=torch.int64))
    with pytest.raises(InputError, match="prompt 1 is empty"):
        generate(TorchEagerRunner(model), [[1], []], 4)


def test_prompt_longer_than_attention_cache(tiny):
    model = tiny("jamba-tiny")
    n = model.config.max_seq_len
    with pytest.raises(InputError, match=f"longer than the attention KV cache \\({n} slots\\)"):
        model(torch.ones(1, n + 1, dtype=torch.int64))
    with pytest.raises(InputError, match="exceed the attention KV cache"):
        generate(TorchEagerRunner(model), [[1] * (n - 3)], 8)


@pytest.mark.parametrize("broken", ["config.json", "mambadeploy.json"])
def test_bad_json_names_the_file(tiny, tmp_path, broken):
    """A checkpoint's JSON file that does not parse ends in one CheckpointError naming it (errors.read_json)."""
    if broken == "mambadeploy.json":
        save_model(tiny("blackmamba-tiny"), tmp_path)  # our own format: mambadeploy.json beside the weights
    (tmp_path / broken).write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"{broken}: not valid JSON"):
        load_model(tmp_path)


def test_bad_export_manifest_json(tmp_path):
    from mambadeploy.export.manifest import Manifest, ManifestError

    (tmp_path / "manifest.json").write_text("[1,")
    with pytest.raises(ManifestError, match="manifest.json: not valid JSON"):
        Manifest.read(tmp_path)


# --------------------------------------------------------------------------- non-finite and truncated weights
def _saved_tiny(tiny, tmp_path, poison=None):
    import copy

    from mambadeploy.models.checkpoint import save_model

    model = copy.deepcopy(tiny("blackmamba-tiny"))  # the fixture's model is shared: poison a copy
    if poison:
        with torch.no_grad():
            dict(model.named_parameters())[poison].view(-1)[3] = float("nan")
    save_model(model, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_nan_weights_are_refused_at_load_naming_the_tensor(tiny, tmp_path):
    """generate printed `0 0 0 ...` and exited 0 on a NaN checkpoint; validate blamed the reference."""
    from mambadeploy.models.checkpoint import load_model

    path = _saved_tiny(tiny, tmp_path, poison="layers.1.ffn.w1")
    with pytest.raises(CheckpointError, match=r"non-finite weights .* layers\.1\.ffn\.w1 \(1 of"):
        load_model(path)


def test_inspect_fails_on_nan_and_truncated_checkpoints(tiny, tmp_path, capsys):
    from mambadeploy.cli import main

    path = _saved_tiny(tiny, tmp_path, poison="embedding.weight")
    assert main(["inspect", str(path)]) == 2 and "non-finite weights" in capsys.readouterr().err
    assert main(["inspect", str(path), "--skip-weights"]) == 0
    capsys.readouterr()
    clean = _saved_tiny(tiny, tmp_path / "c")
    data = clean / "model.safetensors"
    data.write_bytes(data.read_bytes()[:-1000])
    assert main(["inspect", str(clean)]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err


def test_non_finite_logits_stop_generate_naming_the_step(tiny):
    import copy

    from mambadeploy.errors import MambaDeployError
    from mambadeploy.runtime.generate import generate
    from mambadeploy.runtime.torch_eager import TorchEagerRunner

    model = copy.deepcopy(tiny("blackmamba-tiny"))  # the fixture's model is shared: poison a copy
    with torch.no_grad():
        model.layers[0].mixer.out_proj.weight[0, 0] = float("inf")  # Inf reaches the logits through the residual
    with pytest.raises(MambaDeployError, match="NaN or Inf"):
        generate(TorchEagerRunner(model), [[1, 2, 3]], 4)


# --------------------------------------------------------------------------- config and manifest errors name the field
@pytest.mark.parametrize("edit, fragments", [
    (lambda c: c.pop("d_model"), ["mambadeploy.json", "d_model: missing (expected int)"]),
    (lambda c: c.update(vocab_size="512"), ["vocab_size: expected int, found '512'"]),
    (lambda c: c["moe"].update(top_k="1"), ["moe.top_k: expected int, found '1'"]),
])
def test_config_errors_name_file_field_type_and_value(tiny, tmp_path, edit, fragments):
    """These read `ModelConfig.__init__() missing 1 required positional argument` and `'<=' not supported between
    instances of 'str' and 'int'`."""
    save_model(tiny("blackmamba-tiny"), tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "mambadeploy.json").read_text())
    edit(meta["config"])
    (tmp_path / "m" / "mambadeploy.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError.__base__) as info:
        load_model(tmp_path / "m")
    print(info.value)
    assert all(f in str(info.value) for f in fragments) and "__init__" not in str(info.value)


def test_a_wrong_d_model_lists_a_few_keys_and_a_count(tiny, tmp_path):
    """A d_model mismatch mis-shapes every tensor: the message names the first four and counts the rest."""
    from mambadeploy.models.presets import blackmamba_config

    model = tiny("blackmamba-tiny")
    save_blackmamba(model, tmp_path / "bm")
    cfg = json.loads((tmp_path / "bm" / "config.json").read_text())
    cfg["hidden_size"] = 72
    (tmp_path / "bm" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mis-shaped keys \(\d+\): .*\.\.\. and \d+ more") as info:
        load_model(tmp_path / "bm")
    assert len(str(info.value)) < 700 and blackmamba_config
