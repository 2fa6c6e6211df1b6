"""Sampling: greedy is argmax, a seed reproduces, and the top-k / top-p filters keep exactly the tokens they say."""

import pytest
import torch

from mambadeploy.errors import InputError
from mambadeploy.runtime.generate import generate
from mambadeploy.runtime.sampling import Sampler, SamplingConfig
from mambadeploy.runtime.torch_eager import TorchEagerRunner

pytestmark = pytest.mark.usefixtures("no_grad")

DRAWS = 4000


def _draw(cfg, logits, n=DRAWS):
    sampler = Sampler(cfg)
    batch = logits.expand(n, -1)  # n independent rows, one call
    return sampler(batch)


def test_greedy_is_argmax():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(Sampler(SamplingConfig())(logits), logits.argmax(-1))


def test_seed_reproduces_and_differs(tiny):
    runner = TorchEagerRunner(tiny("jamba-tiny"))
    prompts = [[1, 2, 3], [4, 5]]

    def run(seed):
        return generate(runner, prompts, 32, SamplingConfig(temperature=1.0, seed=seed)).tokens

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_top_k_keeps_the_k_most_likely():
    logits = torch.tensor([[2.0, 0.5, 3.0, -1.0, 2.5, 0.0]])
    counts = torch.bincount(_draw(SamplingConfig(temperature=1.0, top_k=3, seed=0), logits), minlength=6)
    assert set(torch.nonzero(counts).flatten().tolist()) == {0, 2, 4}  # the three largest logits, all of them drawn
    expected = torch.softmax(torch.tensor([2.0, 3.0, 2.5]), -1)
    observed = counts[[0, 2, 4]].float() / DRAWS
    print("top-k observed", observed.tolist(), "expected", expected.tolist())
    assert torch.allclose(observed, expected, atol=0.04)  # ~5 sigma at 4000 draws


def test_top_k_one_is_greedy():
    logits = torch.randn(7, 40, generator=torch.Generator().manual_seed(1))
    assert torch.equal(Sampler(SamplingConfig(temperature=2.0, top_k=1))(logits), logits.argmax(-1))


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log()[None]
    # sorted: 0.5, 0.3 (cumulative 0.8 >= 0.7: stop) -> tokens 1 and 3, renormalised to 0.625 / 0.375
    counts = torch.bincount(_draw(SamplingConfig(temperature=1.0, top_p=0.7, seed=0), logits), minlength=4)
    assert set(torch.nonzero(counts).flatten().tolist()) == {1, 3}
    observed = counts[[1, 3]].float() / DRAWS
    print("top-p observed", observed.tolist())
    assert torch.allclose(observed, torch.tensor([0.625, 0.375]), atol=0.04)


def test_top_p_always_keeps_the_most_likely_token():
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    assert set(_draw(SamplingConfig(temperature=1.0, top_p=0.01, seed=0), logits, 200).tolist()) == {1}


def test_plain_sampling_follows_softmax():
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    counts = torch.bincount(_draw(SamplingConfig(temperature=1.0, seed=5), logits), minlength=4)
    expected = torch.softmax(logits[0], -1)
    assert torch.allclose(counts.float() / DRAWS, expected, atol=0.04)


def test_temperature_sharpens():
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    hot = _draw(SamplingConfig(temperature=2.0, seed=5), logits)
    cold = _draw(SamplingConfig(temperature=0.25, seed=5), logits)
    assert (cold == 0).float().mean() > (hot == 0).float().mean() + 0.2


@pytest.mark.parametrize("kwargs, fragment", [
    ({"temperature": -1.0}, "temperature"), ({"top_k": -2}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
])
def test_invalid_settings(kwargs, fragment):
    with pytest.raises(InputError, match=fragment):
        SamplingConfig(**kwargs)
