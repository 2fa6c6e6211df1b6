"""BlackMamba's released layout: a checkpoint written here exactly as Zyphra ships it (config.json +
pytorch_model.bin = {"model": state_dict}, key names from FACTS.md) loads and reproduces the in-memory model."""

import json

import pytest
import torch

from mambadeploy import load_model
from mambadeploy.errors import ConfigError
from mambadeploy.models.checkpoint import empty_model
from mambadeploy.models.loaders.blackmamba import config_from_json, save_blackmamba
from mambadeploy.models.model import init_random_

pytestmark = pytest.mark.usefixtures("no_grad")

RELEASED_LAYER_KEYS = {  # FACTS.md, for a Mamba layer (0) and an MoE layer (1) of blackmamba-tiny (4 experts)
    *(f"decoder.layers.0.mixer.{k}" for k in ("in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight",
                                              "dt_proj.weight", "dt_proj.bias", "A_log", "D", "out_proj.weight")),
    "decoder.layers.0.norm.weight", "decoder.layers.1.norm.weight",
    "decoder.layers.1.mixer.router.weight", "decoder.layers.1.mixer.router.bias",
    *(f"decoder.layers.1.mixer.local_experts.{e}.linear_fc{j}.weight" for e in range(4) for j in (1, 2)),
}


def _released_config(**overrides):
    data = {"num_layers": 4, "hidden_size": 64, "state_size": 16, "conv_dimension": 4, "vocab_size": 512,
            "expansion_factor": 2, "mamba_moe_layers": ["r", "4", "r", "4"], "ffn_hidden_size": 96,
            "bias": False, "add_bias_linear": False, "swiglu": True, "max_sequence_length": 2048}
    data.update(overrides)
    return data


def test_released_layout_loads_and_reproduces(tiny, tmp_path):
    model = tiny("blackmamba-tiny")
    save_blackmamba(model, tmp_path)
    obj = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    assert set(obj) == {"model"}
    keys = set(obj["model"])
    assert RELEASED_LAYER_KEYS <= keys
    assert {"embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "decoder.final_layernorm.bias"} <= keys
    assert obj["model"]["decoder.layers.1.mixer.local_experts.2.linear_fc1.weight"].shape == (2 * 96, 64)
    assert json.loads((tmp_path / "config.json").read_text())["mamba_moe_layers"] == ["r", "4", "r", "4"]

    loaded = load_model(tmp_path)
    assert loaded.source["kind"] == "blackmamba" and loaded.config.layer_pattern() == model.config.layer_pattern()
    ids = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(ids)[0], model(ids)[0])


def test_released_config_maps_to_blackmamba_math():
    cfg = config_from_json(_released_config())
    assert cfg.family == "blackmamba" and cfg.layer_pattern() == "M E M E"
    assert (cfg.moe.router, cfg.moe.top_k, cfg.moe.router_bias) == ("sigmoid_top1", 1, True)
    assert cfg.moe.activation == "gelu"  # what the released code computes, although the config says swiglu
    assert (cfg.final_norm, cfg.tie_embeddings, cfg.mamba.dt_rank, cfg.mamba.d_inner) == ("layernorm", True, 4, 128)
    assert config_from_json(_released_config(activation="silu")).moe.activation == "silu"
    assert config_from_json(_released_config(routing_mode="top1")).moe.router == "softmax_topk"


@pytest.mark.parametrize("overrides", [
    {"activation": "silu"},  # SwiGLU experts, selected by our "activation" key
    {"mamba_moe_layers": ["r", "1", "r", "4"]},  # a dense "1" layer among MoE layers
    {"routing_mode": "top1", "dt_rank": 8},  # softmax router, explicit dt_rank
])
def test_variants_round_trip(tmp_path, overrides):
    config = config_from_json(_released_config(**overrides))
    model = init_random_(empty_model(config), seed=3).eval()
    save_blackmamba(model, tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.config.layers == config.layers and loaded.config.moe == config.moe
    ids = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded(ids)[0], model(ids)[0])


@pytest.mark.parametrize("overrides, fragment", [
    ({"mamba_moe_layers": ["r", "r8", "r", "4"]}, r"parallel Mamba \+ MoE"),
    ({"mamba_moe_layers": ["r", "4"]}, "has 2 entries but num_layers is 4"),
    ({"mamba_moe_layers": ["r", "4", "r", "8"]}, "different expert counts"),
    ({"swiglu": False}, "un-gated"),
    ({"add_bias_linear": True}, "add_bias_linear"),
    ({"activation": "relu"}, "activation 'relu'"),
])
def test_unsupported_configs_are_named(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        config_from_json(_released_config(**overrides))


def test_missing_required_config_keys_listed():
    data = _released_config()
    del data["hidden_size"], data["state_size"]
    with pytest.raises(ConfigError, match=r"\['hidden_size', 'state_size'\]"):
        config_from_json(data)
