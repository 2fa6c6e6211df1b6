"""Parity with transformers' own MambaForCausalLM and JambaForCausalLM: tiny random models built from configs here (no
download), saved with save_pretrained, loaded by load_model. Logits within the measured fp32 bound of the logit scale,
and 64 greedy tokens identical (transformers' side decodes with its own cache)."""

import json

import pytest
import torch
from components import DEV_INSTALL, require_module
from hf_tiny import fan_in_init
from safetensors.torch import load_file, save_file

from mambadeploy import load_model
from mambadeploy.runtime.generate import generate
from mambadeploy.runtime.torch_eager import TorchEagerRunner
from mambadeploy.validate.tolerances import assert_logits_close

pytestmark = pytest.mark.usefixtures("no_grad")

transformers = require_module("transformers", DEV_INSTALL)

VOCAB = 99


def _hf_greedy(model, prompt, n, cache_arg):
    """Greedy decoding through transformers' own cache, one token per call."""
    out = model(prompt, use_cache=True)
    cache = getattr(out, cache_arg)
    tokens = []
    for _ in range(n):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(nxt))
        out = model(nxt, use_cache=True, **{cache_arg: cache})
        cache = getattr(out, cache_arg)
    return tokens


@pytest.fixture(scope="module")
def hf_mamba(tmp_path_factory):
    config = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, state_size=16,
                                      time_step_rank=4, use_conv_bias=True, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = fan_in_init(transformers.MambaForCausalLM(config))
    path = tmp_path_factory.mktemp("hf_mamba")
    model.save_pretrained(path)
    return model, path


def _jamba_config(**kw):
    # mirrors transformers' own tests (vocab 99, hidden 32, 2 experts); periods chosen so the 5 layers cover
    # Mamba+MLP, attention+MoE, Mamba+MoE and attention+MLP
    base = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 5,
            "num_attention_heads": 4, "num_key_value_heads": 2, "attn_layer_period": 3, "attn_layer_offset": 1,
            "expert_layer_period": 2, "expert_layer_offset": 1, "num_experts": 2, "num_experts_per_tok": 2,
            "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_dt_rank": 4, "tie_word_embeddings": False,
            # the KV cache is sized by the context (transformers' default 262144 would make every reference step
            # read 262144 slots)
            "max_position_embeddings": 256,
            # eager: transformers' grouped-mm experts need 16-byte strides (intermediate 37 has not); same math
            "experts_implementation": "eager", "attn_implementation": "eager"}
    base.update(kw)
    return transformers.JambaConfig(**base)


@pytest.fixture(scope="module")
def hf_jamba(tmp_path_factory):
    torch.manual_seed(0)
    model = fan_in_init(transformers.JambaForCausalLM(_jamba_config()))
    path = tmp_path_factory.mktemp("hf_jamba")
    model.save_pretrained(path)
    return model, path


# (experts, top-k) where top-k < experts: routing actually selects, so a wrong choice of experts changes the logits
ROUTED = [(4, 2), (4, 1)]


@pytest.fixture(scope="module", params=ROUTED, ids=lambda ek: f"{ek[0]}experts-top{ek[1]}")
def hf_jamba_routed(request, tmp_path_factory):
    experts, top_k = request.param
    torch.manual_seed(1)
    model = fan_in_init(transformers.JambaForCausalLM(_jamba_config(num_experts=experts, num_experts_per_tok=top_k)))
    path = tmp_path_factory.mktemp(f"hf_jamba_{experts}e_top{top_k}")
    model.save_pretrained(path)
    return model, path, experts, top_k


def _prompt():
    return torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("which", ["mamba", "jamba"])
def test_logits_match_transformers(which, hf_mamba, hf_jamba):
    hf, path = {"mamba": hf_mamba, "jamba": hf_jamba}[which]
    ours = load_model(path)
    assert ours.source["kind"] == "hf" and ours.source["model_type"] == which
    ids = _prompt()
    expected = hf(ids).logits.float()
    got, _ = ours(ids)
    assert_logits_close(got, expected, torch.float32, what=f"hf {which} logits", check="transformers")


@pytest.mark.parametrize("which", ["mamba", "jamba"])
def test_greedy_64_tokens_match_transformers(which, hf_mamba, hf_jamba):
    hf, path = {"mamba": hf_mamba, "jamba": hf_jamba}[which]
    ours = load_model(path)
    prompt = _prompt()[:1, :8]
    expected = _hf_greedy(hf, prompt, 64, "cache_params" if which == "mamba" else "past_key_values")
    got = generate(TorchEagerRunner(ours), [prompt[0].tolist()], 64).tokens[0]
    print(f"{which}: {len(set(expected))} distinct tokens in 64")
    assert len(set(expected)) >= 16, "degenerate generation: the comparison would prove little"
    assert got == expected


def test_jamba_layer_mapping(hf_jamba):
    _, path = hf_jamba
    cfg = load_model(path).config
    assert cfg.layer_pattern() == "MF AE MF ME AF"
    assert (cfg.moe.n_experts, cfg.moe.top_k, cfg.moe.router) == (2, 2, "softmax_topk")
    assert (cfg.attention.n_heads, cfg.attention.n_kv_heads, cfg.attention.head_dim) == (4, 2, 8)
    assert cfg.mamba.bcdt_norm and not cfg.tie_embeddings


def test_jamba_fused_expert_layout(hf_jamba, tmp_path):
    """transformers 5 keeps experts fused in memory (experts.gate_up_proj (E, 2F, d), experts.down_proj (E, d, F));
    a file in that layout loads to the same model."""
    _, path = hf_jamba
    sd = load_file(path / "model.safetensors")
    for layer in (1, 3):
        p = f"model.layers.{layer}.feed_forward.experts"
        gate_up = [torch.cat([sd.pop(f"{p}.{e}.gate_proj.weight"), sd.pop(f"{p}.{e}.up_proj.weight")]) for e in range(2)]
        sd[f"{p}.gate_up_proj"] = torch.stack(gate_up)
        sd[f"{p}.down_proj"] = torch.stack([sd.pop(f"{p}.{e}.down_proj.weight") for e in range(2)])
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    a, b = load_model(path), load_model(tmp_path)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_sharded_safetensors(hf_mamba, tmp_path):
    hf, path = hf_mamba
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    a, b = load_model(path), load_model(tmp_path)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_untied_mamba_head(tmp_path):
    config = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, tie_word_embeddings=False)
    torch.manual_seed(1)
    hf = fan_in_init(transformers.MambaForCausalLM(config))
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.lm_head is not None
    ids = _prompt()[:, :12]
    assert_logits_close(ours(ids)[0], hf(ids).logits.float(), what="untied mamba", check="transformers")


def test_low_precision_load(hf_jamba):
    """dtype= converts each parameter on load: bf16 weights are exactly the fp32 ones rounded."""
    _, path = hf_jamba
    ours, ref = load_model(path, dtype="bf16"), load_model(path)
    assert ours.dtype == torch.bfloat16
    for (name, x), (_, y) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(x, y.to(torch.bfloat16)), name


def _hf_routes(hf, ids) -> set[tuple]:
    """The expert sets transformers' own routers pick, over every token of every MoE layer."""
    routes = []

    def hook(module, inputs, output):  # the router returns (logits, top-k weights, top-k expert index)
        routes.extend(tuple(sorted(r)) for r in output[2].reshape(-1, output[2].shape[-1]).tolist())

    handles = [m.register_forward_hook(hook) for n, m in hf.named_modules() if n.endswith("feed_forward.router")]
    assert handles, "no Jamba router modules found"
    hf(ids)
    for h in handles:
        h.remove()
    return set(routes)


def test_routed_jamba_matches_transformers(hf_jamba_routed):
    """>= 4 experts at top-2 and top-1: logits of a batch of prompts and 32 greedy tokens (transformers' cache) match,
    and transformers' routers pick several different expert sets, so top-k selection is really compared."""
    hf, path, experts, top_k = hf_jamba_routed
    ours = load_model(path)
    assert (ours.config.moe.n_experts, ours.config.moe.top_k) == (experts, top_k)
    ids = _prompt()
    routes = _hf_routes(hf, ids)
    print(f"{experts} experts top-{top_k}: {len(routes)} distinct expert sets chosen")
    assert len(routes) >= 3, "routing never varies: the comparison would not check top-k selection"
    got, _ = ours(ids)
    assert_logits_close(got, hf(ids).logits.float(), torch.float32, what=f"hf jamba {experts}e top-{top_k} logits",
                        check="transformers")
    prompt = _prompt()[:1, :8]
    expected = _hf_greedy(hf, prompt, 32, "past_key_values")
    assert len(set(expected)) >= 8, "degenerate generation: the comparison would prove little"
    assert generate(TorchEagerRunner(ours), [prompt[0].tolist()], 32).tokens[0] == expected
