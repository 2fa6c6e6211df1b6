"""The KV cache is sized by what the user asks: load_model(max_context=...) / --max-context, the checkpoint's own
context by default (a transformers Jamba's max_position_embeddings, no cap), and inspect's bytes per sequence."""

from __future__ import annotations

import json

import pytest
import torch
from components import DEV_INSTALL, require_module

from mambadeploy.cli import main
from mambadeploy.errors import ConfigError
from mambadeploy.models.checkpoint import load_model
from mambadeploy.models.state import state_bytes_by_kind, state_specs


def test_load_model_sizes_the_cache():
    model = load_model("jamba-tiny", max_context=77)
    assert model.config.max_seq_len == 77
    assert all(b.mixer.max_len == 77 for b in model.layers if b.kind.mixer == "attention")
    key = next(s for s in state_specs(model.config) if s.name.endswith(".key"))
    assert key.concrete_shape(1)[2] == 77
    _, state = model.prefill(torch.tensor([[1, 2, 3]]))
    assert state[key.name].shape[2] == 77
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ConfigError, match="max context"):
            load_model("jamba-tiny", max_context=bad)


def test_hf_jamba_keeps_its_context(tmp_path):
    require_module("transformers", DEV_INSTALL)
    from hf_tiny import save_tiny_jamba

    path = save_tiny_jamba(tmp_path, max_position_embeddings=5000)  # above the old 4096 cap
    assert load_model(path).config.max_seq_len == 5000
    assert load_model(path, max_context=300).config.max_seq_len == 300


def test_inspect_reports_state_and_kv_per_sequence(capsys):
    assert main(["inspect", "jamba-1.5-mini", "--dtype", "bf16", "--max-context", "262144", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    # issue 21: 4 attention layers x (K, V) x 8 KV heads x 128 x 262144 tokens x 2 bytes = 4.3 GB
    assert info["kv_cache_len"] == 262144
    assert info["kv_bytes_per_sequence"] == 4 * 2 * 8 * 128 * 262144 * 2
    assert info["kv_bytes_per_sequence_fp8"] == info["kv_bytes_per_sequence"] // 2
    # 28 Mamba layers: conv (8192 x 4) + SSM (8192 x 16), fp32
    assert info["recurrent_state_bytes_per_sequence"] == 28 * 8192 * (4 + 16) * 4
    assert info["state_bytes_per_sequence"] == (info["kv_bytes_per_sequence"]
                                                + info["recurrent_state_bytes_per_sequence"] + 8)


def test_state_bytes_by_kind_follows_the_context():
    config = load_model("jamba-tiny", max_context=10).config
    small = state_bytes_by_kind(config)
    config.max_seq_len = 20
    assert state_bytes_by_kind(config)["kv"] == 2 * small["kv"]
    assert state_bytes_by_kind(config)["recurrent"] == small["recurrent"]


def test_generate_refuses_a_prompt_longer_than_the_asked_context(capsys):
    code = main(["generate", "jamba-tiny", "--prompt-ids", "1,2,3,4,5,6", "--max-context", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "KV cache" in err and len(err.strip().splitlines()) == 1
    code = main(["generate", "jamba-tiny", "--prompt-ids", "1,2,3", "--max-context", "8", "--max-new-tokens", "2",
                 "--json"])
    assert code == 0 and len(json.loads(capsys.readouterr().out)["prompts"][0]["tokens"]) == 2
