"""The generation loop: batched prompts of different lengths give exactly what each prompt gives alone; greedy
tokens are the argmax chain of the full-sequence forward; stop tokens end a row."""

import pytest
import torch

from mambadeploy.errors import InputError
from mambadeploy.runtime.generate import generate, pad_prompts
from mambadeploy.runtime.torch_eager import TorchEagerRunner

pytestmark = pytest.mark.usefixtures("no_grad")

NEW = 24


def _prompts(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def test_batched_equals_each_prompt_alone(tiny, preset):
    runner = TorchEagerRunner(tiny(preset))
    prompts = _prompts(runner.config.vocab_size, [5, 1, 12, 7])
    batched = generate(runner, prompts, NEW)
    for i, p in enumerate(prompts):
        alone = generate(runner, [p], NEW)
        assert batched.tokens[i] == alone.tokens[0], f"{preset}: row {i} (len {len(p)}) differs when batched"
    assert batched.prompt_lengths == [5, 1, 12, 7] and batched.new_tokens == 4 * NEW


def test_greedy_is_argmax_of_full_forward(tiny, preset):
    model = tiny(preset)
    prompt = _prompts(model.config.vocab_size, [6], seed=1)[0]
    tokens = generate(TorchEagerRunner(model), [prompt], NEW).tokens[0]
    logits, _ = model(torch.tensor([prompt + tokens]))
    expected = logits[0, len(prompt) - 1: -1].argmax(-1).tolist()
    assert tokens == expected


def test_stop_tokens_end_only_their_row(tiny):
    runner = TorchEagerRunner(tiny("blackmamba-tiny"))
    prompts = _prompts(512, [4, 9], seed=2)
    free = generate(runner, prompts, NEW).tokens
    stop = free[0][5]
    cut = free[0].index(stop) + 1  # the stop token is kept and ends the row
    result = generate(runner, prompts, NEW, stop_tokens=[stop])
    assert result.tokens[0] == free[0][:cut]
    expected_1 = free[1][: free[1].index(stop) + 1] if stop in free[1] else free[1]
    assert result.tokens[1] == expected_1


def test_timings_and_rates(tiny):
    result = generate(TorchEagerRunner(tiny("moe-mamba-tiny")), [[1, 2, 3]], 8)
    assert result.prefill_s > 0 and result.decode_s > 0 and len(result.step_s) == 7
    assert result.decode_tokens_per_s > 0
    assert set(result.to_dict()) >= {"tokens", "prefill_s", "decode_s", "decode_tokens_per_s"}


def test_left_padding_layout():
    ids, lengths = pad_prompts([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and lengths.tolist() == [3, 1]


@pytest.mark.parametrize("bad, fragment", [(0, "max_new_tokens must be >= 1"), (-3, "max_new_tokens must be >= 1"),
                                           (100000000000, "above the limit of 1073741824")])
def test_bad_max_new_tokens(tiny, bad, fragment):
    with pytest.raises(InputError, match=fragment):
        generate(TorchEagerRunner(tiny("blackmamba-tiny")), [[1]], bad)


def test_a_large_max_new_tokens_allocates_nothing_up_front(tiny):
    """A recurrent model has no length limit: 10^8 new tokens with a stop at the first one returns at once (a user saw
    an 800 GB allocation and a traceback for --max-new-tokens 100000000000)."""
    model = tiny("blackmamba-tiny")
    first = generate(TorchEagerRunner(model), [[1, 2, 3]], 1).tokens[0][0]
    result = generate(TorchEagerRunner(model), [[1, 2, 3]], 10 ** 8, stop_tokens=[first])
    assert result.tokens == [[first]]


def test_no_prompts(tiny):
    with pytest.raises(InputError, match="no prompts"):
        generate(TorchEagerRunner(tiny("blackmamba-tiny")), [], 4)
