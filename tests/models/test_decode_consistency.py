"""Stateful consistency (state-spaces/mamba#683 is this bug elsewhere): prefill + step-by-step decode must reproduce the
full-sequence logits for hundreds of tokens, and end in the same state."""

import pytest
import torch

from mambadeploy.validate.tolerances import assert_logits_close, op_checker

check_op = op_checker("decode_consistency")  # fp32 on the CPU: this op's measured bound

pytestmark = pytest.mark.usefixtures("no_grad")

PROMPT, STEPS = 8, 260


def test_step_reproduces_full_sequence(tiny, preset):
    model = tiny(preset)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, model.config.vocab_size, (2, PROMPT + STEPS), generator=g)
    full, full_state = model(ids)

    logits, state = model.prefill(ids[:, :PROMPT])
    stepped = [logits]
    for t in range(PROMPT, PROMPT + STEPS):
        logits, state = model.step(ids[:, t], state)
        stepped.append(logits)
    stepped = torch.stack(stepped, dim=1)  # positions PROMPT-1 .. end

    assert stepped.shape[1] == STEPS + 1 >= 256
    assert_logits_close(stepped, full[:, PROMPT - 1:], torch.float32, what=f"{preset} step vs full ({STEPS} steps)",
                        check="reference")
    assert list(state) == list(full_state)
    for name in full_state:
        if name == "pos":
            assert torch.equal(state[name], full_state[name])
        else:
            check_op(state[name], full_state[name], torch.float32, what=f"{preset} state {name}")


def test_prefill_is_last_position_of_forward(tiny, preset):
    model = tiny(preset)
    ids = torch.randint(0, model.config.vocab_size, (3, 33), generator=torch.Generator().manual_seed(3))
    full, _ = model(ids)
    last, _ = model.prefill(ids)
    assert torch.equal(last, full[:, -1])
