"""The plain per-token oracles agree with the static-gather MoE (both of expert_gather_ref's paths, every router kind),
with the batched, left-padded whole model, and with the exported ONNX graphs run by ORT on the CPU: the export traces
the reference's own router, so only an independent oracle sees a routing bug there."""

import pytest
import torch
from components import DEV_INSTALL, require_module

from mambadeploy.models.layers import MoE
from mambadeploy.models.oracle import model_oracle, moe_oracle
from mambadeploy.validate.tolerances import assert_logits_close, op_checker

check_op = op_checker("moe_oracle")  # fp32 on the CPU: this op's measured bound

pytestmark = pytest.mark.usefixtures("no_grad")

# preset -> its router kind: sigmoid top-1 (BlackMamba), softmax top-1 (MoE-Mamba), softmax top-2 (Jamba)
ROUTERS = {"blackmamba-tiny": ("sigmoid_top1", 1), "moe-mamba-tiny": ("softmax_topk", 1), "jamba-tiny": ("softmax_topk", 2)}


def _moe_layers(model):
    return [b.ffn for b in model.layers if isinstance(b.ffn, MoE)]


@pytest.mark.parametrize("tokens", [1, 3, 9, 33])
def test_moe_oracle_matches_static_gather(tiny, preset, tokens):
    model = tiny(preset)
    moes = _moe_layers(model)
    assert moes and (moes[0].router_kind, moes[0].top_k) == ROUTERS[preset]
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, model.config.d_model, generator=g)
    n_experts = moes[0].w1.shape[0]
    path = "dense-combine" if tokens * moes[0].top_k >= n_experts else "gather"
    for i, moe in enumerate(moes):
        check_op(moe(x), moe_oracle(moe, x), torch.float32, what=f"{preset} MoE {i} T={tokens} ({path} path)")


def test_both_gather_paths_are_exercised():
    """The token counts above reach both branches of expert_gather_ref for every router kind (E = 4 in the presets)."""
    for _, k in ROUTERS.values():
        paths = {t * k >= 4 for t in (1, 3, 9, 33)}
        assert paths == {True, False}


def test_moe_oracle_batched_shape(tiny):
    moe = _moe_layers(tiny("jamba-tiny"))[0]
    x = torch.randn(2, 5, moe.w1.shape[2], generator=torch.Generator().manual_seed(0))
    check_op(moe(x), moe_oracle(moe, x), torch.float32, what="jamba MoE (2, 5, d)")


def test_model_oracle_matches_left_padded_batch(tiny, preset):
    """Each row computed alone, token by token, vs the batched forward with left padding."""
    model = tiny(preset)
    g = torch.Generator().manual_seed(11)
    lengths = [17, 6, 1]
    rows = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]
    L = max(lengths)
    ids = torch.zeros(len(rows), L, dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = torch.tensor(r)
    logits, _ = model(ids, torch.tensor(lengths))
    for i, r in enumerate(rows):
        assert_logits_close(logits[i, L - len(r):], model_oracle(model, r), what=f"{preset} row {i} (len {len(r)})",
                            check="reference")


def test_exported_graphs_match_model_oracle(tiny, preset, tmp_path):
    """Every tiny preset has 4 experts (sigmoid top-1, softmax top-1, softmax top-2): export it fresh (no cache), run the
    prefill and 3 decode graphs on ORT CPU, and compare each step's logits with the oracle over the whole sequence.
    (The portable graphs: the custom-op graphs are held to torch by tests/runtime/test_ort_runner.py; one export per
    router kind keeps this within the CI budget.)"""
    ops = "portable"
    require_module("onnxruntime", DEV_INSTALL)
    from mambadeploy.export.exporter import export_model
    from mambadeploy.runtime.ort_runner import OrtRunner

    model = tiny(preset)
    assert model.config.moe.n_experts >= 4 and model.config.moe.top_k < model.config.moe.n_experts
    export_model(model, tmp_path / "export", ops=ops)
    runner = OrtRunner.from_dir(tmp_path / "export")
    ids = torch.randint(0, model.config.vocab_size, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    logits, state = runner.prefill(torch.tensor([ids]))
    for step in range(4):
        want = model_oracle(model, ids)[-1]
        assert_logits_close(logits[0], want, what=f"{preset} ORT {ops} vs oracle, step {step}", check=f"ort_{ops}")
        ids.append(int(logits[0].argmax()))
        if step < 3:
            logits, state = runner.step(torch.tensor([ids[-1]]), state)
