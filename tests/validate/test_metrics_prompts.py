"""Small pieces of validate: error figures, prompts files, backend lists."""

import json

import pytest
import torch

from mambadeploy.errors import InputError
from mambadeploy.validate.backends import parse_backends, unavailable_reason
from mambadeploy.validate.latency import decode_bytes_per_step, hbm_peak, roofline
from mambadeploy.validate.metrics import logit_errors, percentile, tensor_drift
from mambadeploy.validate.prompts import load_prompts, random_prompts


def test_logit_errors_known_values():
    expected = torch.tensor([[4.0, -2.0, 0.0], [1.0, 0.0, 0.5]])
    actual = expected.clone()
    actual[0, 1] += 0.4
    e = logit_errors(actual, expected)
    print(e)
    assert e["max_abs"] == pytest.approx(0.4)
    assert e["max_rel"] == pytest.approx(0.4 / 4.0)  # scale = max |expected| = 4
    assert e["mean_abs"] == pytest.approx(0.4 / 6)
    assert e["cosine"] < 1.0 and e["cosine"] > 0.99


def test_nan_logits_fail_every_bound():
    expected = torch.ones(1, 4)
    e = logit_errors(torch.full((1, 4), float("nan")), expected)
    assert e["max_rel"] >= 1e30 and e["cosine"] == -1.0
    json.dumps(e, allow_nan=False)  # JSON has no NaN: the figures must stay finite


def test_tensor_drift_relative_to_own_scale():
    ref = torch.tensor([0.0, 0.01, -0.02])
    d = tensor_drift(ref + torch.tensor([0.0, 0.001, 0.0]), ref)
    assert d["max_rel"] == pytest.approx(0.05)
    assert tensor_drift(torch.zeros(3), torch.zeros(3))["max_rel"] == 0.0


def test_percentile():
    assert percentile(list(range(101)), 99) == pytest.approx(99)
    assert percentile([], 50) is None


def test_prompts_file_formats(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps([[1, 2, 3], [4]]))
    (tmp_path / "p.txt").write_text("# comment\n1 2, 3\n\n4\n")
    assert load_prompts(tmp_path / "p.json", 10) == [[1, 2, 3], [4]]
    assert load_prompts(tmp_path / "p.txt", 10) == [[1, 2, 3], [4]]
    assert random_prompts(10, 2, 5, seed=1) == random_prompts(10, 2, 5, seed=1)


@pytest.mark.parametrize("content, message", [
    ("[[1, 2, 700]]", "outside the model's vocabulary"),
    ("[[1], []]", "prompt 1 is empty"),
    ("1 2 x", "line 1"),
    ('{"prompts": 3}', "list of lists"),
    ("[[1.5]]", "integer token ids"),
    ("", "holds no prompts"),
])
def test_bad_prompts_files(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        load_prompts(path, 512)


def test_backend_lists():
    reqs, explicit = parse_backends("torch,torch:bf16,torch", "fp32")
    assert [r.label for r in reqs] == ["torch:fp32", "torch:bf16"] and explicit
    reqs, explicit = parse_backends(None, "fp16")
    assert not explicit and reqs[0].label == "torch:fp16"
    with pytest.raises(InputError, match="unknown backend 'tensorrt'"):
        parse_backends("torch,tensorrt", "fp32")
    with pytest.raises(InputError, match="unknown dtype 'int8'"):
        parse_backends("torch:int8", "fp32")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages of a machine without a GPU")
def test_gpu_backends_say_why_on_cpu():
    assert unavailable_reason("torch") is None
    for name in ("torch-fast", "ort-cuda", "trt"):
        assert "needs a CUDA GPU" in unavailable_reason(name)


def test_roofline_table_and_bytes():
    from mambadeploy.models.checkpoint import load_model

    assert hbm_peak("NVIDIA H100 80GB HBM3")[1] == 3.35e12
    assert hbm_peak("NVIDIA H200")[1] == 4.8e12
    assert hbm_peak(None) is None
    model = load_model("blackmamba-tiny")
    cfg = model.config
    b1 = decode_bytes_per_step(model, cfg, torch.float32, 1)
    b8 = decode_bytes_per_step(model, cfg, torch.float32, 8)
    per_expert = model.layers[1].ffn.w1[0].numel() + model.layers[1].ffn.w2[0].numel()
    # batch 8 can reach all 4 experts of each of the 2 MoE layers, batch 1 only one each
    assert b8 - b1 >= 2 * 3 * per_expert * 4
    assert roofline(b1, 0.5, None)["percent"] is None
    r = roofline(b1, 0.5, "NVIDIA H100 80GB HBM3")
    assert r["percent"] == pytest.approx(100 * b1 / 3.35e12 * 1e3 / 0.5)


def test_logits_gate_low_precision_follows_the_baseline():
    from mambadeploy.validate import tolerances as tol

    assert tol.logits_gate(torch.float32, {"max_rel": 0.5, "top1_agreement": 0.5})["source"] == "fixed"
    tight = tol.logits_gate(torch.bfloat16, {"max_rel": 1e-3, "top1_agreement": 1.0})
    assert tight == {"logits_max_rel": tol.LOGITS_REL[torch.bfloat16],
                     "top1_agreement": tol.TOP1_AGREEMENT[torch.bfloat16], "source": "fixed"}
    loose = tol.logits_gate(torch.bfloat16, {"max_rel": 0.3, "top1_agreement": 0.96})
    assert loose["source"] == "precision baseline"
    assert loose["logits_max_rel"] == pytest.approx(0.3 * tol.BASELINE_ERR_FACTOR)
    assert loose["top1_agreement"] == pytest.approx(0.96 - tol.BASELINE_TOP1_SLACK)


def test_logits_gate_ignores_a_baseline_that_does_not_hold_up():
    """A torch baseline far from fp32 (the dtype cannot represent the model) loosens nothing: the fixed bounds apply."""
    from mambadeploy.validate import tolerances as tol

    gate = tol.logits_gate(torch.bfloat16, {"max_rel": 1.4, "top1_agreement": 0.38})
    assert gate["logits_max_rel"] == tol.LOGITS_REL[torch.bfloat16]
    assert gate["top1_agreement"] == tol.TOP1_AGREEMENT[torch.bfloat16]
    assert gate["source"].startswith("fixed (the precision baseline misses it too")
