"""Shared by the parallel tests: a tiny transformers-built Jamba saved as safetensors (no download), and the greedy
comparison of a parallel runner with the single-process model."""

from __future__ import annotations

import torch
from components import DEV_INSTALL, require_module
from hf_tiny import fan_in_init

from mambadeploy.validate.tolerances import PARALLEL_LOGITS_REL, rel_to_scale

HF_VOCAB = 99
TIMEOUT_S = 30.0  # collective timeout of the test pools (gloo sees a killed peer at once; this bounds a hang)


def hf_jamba_config(**kw):
    """transformers' own test sizes (vocab 99, hidden 32, 2 experts top-2), with widths that tp=2 divides and ONE KV
    head (tp=2 then replicates it); 5 layers cover Mamba+MLP, attention+MoE, Mamba+MoE and attention+MLP."""
    transformers = require_module("transformers", DEV_INSTALL)
    base = {"vocab_size": HF_VOCAB, "hidden_size": 32, "intermediate_size": 36, "num_hidden_layers": 5,
            "num_attention_heads": 4, "num_key_value_heads": 1, "attn_layer_period": 3, "attn_layer_offset": 1,
            "expert_layer_period": 2, "expert_layer_offset": 1, "num_experts": 2, "num_experts_per_tok": 2,
            "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_dt_rank": 4, "tie_word_embeddings": False,
            "experts_implementation": "eager", "attn_implementation": "eager"}
    base.update(kw)
    return transformers.JambaConfig(**base)


def save_hf_jamba(path) -> str:
    transformers = require_module("transformers", DEV_INSTALL)
    torch.manual_seed(0)
    model = fan_in_init(transformers.JambaForCausalLM(hf_jamba_config()))
    model.save_pretrained(path)
    return str(path)


def compare_greedy(runner, reference, vocab: int, steps: int = 64, seed: int = 0):
    """Both prefill the same left-padded batch (lengths 9 and 5), then each decodes greedily on its own tokens;
    logits compared every step, tokens required identical. -> (worst relative error, the two final states)."""
    g = torch.Generator().manual_seed(seed)
    ids, lengths = torch.randint(0, vocab, (2, 9), generator=g), torch.tensor([9, 5])
    with torch.no_grad():
        ref_logits, ref_state = reference.prefill(ids, lengths)
    logits, state = runner.prefill(ids, lengths)
    errors = [rel_to_scale(logits, ref_logits)]
    gathered = runner.state_to_torch(state)
    state_err = max((gathered[k].float() - v.float()).abs().max().item() for k, v in ref_state.items())
    assert set(gathered) == set(ref_state) and all(gathered[k].shape == v.shape for k, v in ref_state.items())
    for step in range(steps):
        mine, theirs = logits.argmax(-1), ref_logits.argmax(-1)
        assert torch.equal(mine, theirs), f"greedy tokens differ at step {step}: {mine.tolist()} vs {theirs.tolist()}"
        with torch.no_grad():
            ref_logits, ref_state = reference.step(theirs, ref_state)
        logits, state = runner.step(mine, state)
        errors.append(rel_to_scale(logits, ref_logits))
    worst = max(e[0] for e in errors)
    d = runner.describe()
    print(f"tp={d['tp']} ep={d['ep']} world={d['world']}: logits max err / scale {worst:.3e}, mean abs err "
          f"{max(e[1] for e in errors):.3e}, prefill state max abs err {state_err:.3e} "
          f"(bound {PARALLEL_LOGITS_REL:.0e})")
    assert worst <= PARALLEL_LOGITS_REL
    assert state_err <= PARALLEL_LOGITS_REL * 10  # states are O(1): the same reassociation bound, unscaled
    return worst
