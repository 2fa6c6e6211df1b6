"""The trained testbed (models/trained) makes low-precision validation meaningful: its logits are not near-ties, so
fp16 / bf16 agree with fp32 far better than on random weights. Held-out teacher-forced top-1 agreement per dtype, and
`mambadeploy validate` passing fp16 and bf16 on the fixed gate (no loosening by the precision baseline)."""

import json

import pytest
import torch

from mambadeploy.cli import main
from mambadeploy.models.calibrate import windows_from_tokens
from mambadeploy.models.checkpoint import load_model
from mambadeploy.models.trained import TRAINED_CONFIGS, heldout_bytes
from mambadeploy.validate.tolerances import TOP1_AGREEMENT, TRAINED_HELDOUT_TOP1

WINDOWS = windows_from_tokens(heldout_bytes().long(), 8, 128)


@pytest.mark.parametrize("name", list(TRAINED_CONFIGS))
def test_trained_models_predict_held_out_text_and_hold_up_in_low_precision(name):
    reference = load_model(name)
    with torch.no_grad():
        logits = reference(WINDOWS)[0]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), WINDOWS[:, 1:].reshape(-1))
        print(f"{name}: held-out perplexity {nll.exp():.3f} per byte")
        assert nll.exp() < 8.0  # a uniform byte model is 256; an untrained model ~ 250
        top1 = logits.argmax(-1)
        for dtype, bound in TRAINED_HELDOUT_TOP1.items():
            agree = (load_model(name, dtype=dtype)(WINDOWS)[0].argmax(-1) == top1).float().mean().item()
            print(f"{name} {dtype}: teacher-forced top-1 agreement with fp32 {agree:.4f} (bound {bound})")
            assert agree >= bound


def test_validate_passes_fp16_and_bf16_on_the_fixed_gate(tmp_path):
    out = tmp_path / "r.json"
    rc = main(["validate", "blackmamba-small-trained", "--backends", "torch,torch:fp16,torch:bf16", "--new-tokens",
               "16", "--num-prompts", "2", "--json", str(out), "--quiet"])
    result = json.loads(out.read_text())
    assert rc == 0 and result["passed"]
    for backend in result["backends"][1:]:
        top1 = backend["teacher_forced"]["top1_agreement"]
        print(backend["label"], top1, backend["tolerance"]["source"])
        assert backend["tolerance"]["source"] == "fixed" and top1 >= TOP1_AGREEMENT[torch.float16]
