"""The generation loop over any Runner: batched prompts of different lengths (left padding), greedy or sampled,
stop tokens, timings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..errors import InputError, MambaDeployError
from .base import Runner
from .sampling import Sampler, SamplingConfig


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per prompt (a stop token, when hit, is included and ends the row)
    prompt_lengths: list[int]
    prefill_s: float
    decode_s: float
    step_s: list[float] = field(default_factory=list)

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def decode_tokens_per_s(self) -> float:
        """Generated tokens per second of the decode loop (all rows together); the first token comes from prefill."""
        n = sum(max(len(t) - 1, 0) for t in self.tokens)
        return n / self.decode_s if self.decode_s > 0 else float("nan")

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "prompt_lengths": self.prompt_lengths, "prefill_s": self.prefill_s,
                "decode_s": self.decode_s, "new_tokens": self.new_tokens,
                "decode_tokens_per_s": self.decode_tokens_per_s}


def pad_prompts(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts into (B, Lmax) int64 ids and (B,) lengths."""
    if not prompts:
        raise InputError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise InputError(f"prompt {i} is empty: give at least one token")
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p, dtype=torch.int64)
    return ids, torch.tensor([len(p) for p in prompts], dtype=torch.int64)


def check_vocab(prompts, vocab_size: int) -> None:
    bad = sorted({t for p in prompts for t in p if not 0 <= t < vocab_size})
    if bad:
        raise InputError(f"token id(s) {bad[:5]} outside the vocabulary [0, {vocab_size})")


def check_finite(logits: torch.Tensor, where: str) -> None:
    """Refuse NaN / Inf logits with one error naming the step (a runner fed non-finite weights otherwise decodes token
    0 forever and exits 0)."""
    if not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).sum())
        raise MambaDeployError(f"{where}: {bad} of {logits.numel()} logits are NaN or Inf; the weights or the runtime "
                               "produced non-finite values (mambadeploy inspect CHECKPOINT checks the weights)")


# A recurrent model has no length limit of its own: this bounds a request anyway (2^30 tokens would take days to
# generate); nothing is allocated in proportion to it up front.
MAX_NEW_TOKENS = 1 << 30


def generate(runner: Runner, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingConfig | None = None,
             stop_tokens=(), pad_id: int = 0, progress: bool = False) -> GenerationResult:
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if max_new_tokens > MAX_NEW_TOKENS:
        raise InputError(f"max_new_tokens {max_new_tokens} is above the limit of {MAX_NEW_TOKENS} (2^30) new tokens")
    check_vocab(prompts, runner.config.vocab_size)
    bad_stops = sorted({t for t in stop_tokens if not 0 <= int(t) < runner.config.vocab_size})
    if bad_stops:
        raise InputError(f"stop id(s) {bad_stops[:5]} outside the vocabulary [0, {runner.config.vocab_size})")
    ids, lengths = pad_prompts(prompts, pad_id)
    limit = runner.max_length
    if limit is not None and ids.shape[1] + max_new_tokens - 1 > limit:
        raise InputError(f"prompt ({ids.shape[1]} tokens) + {max_new_tokens} new tokens exceed the attention KV "
                         f"cache of {limit} slots")
    sampler = Sampler(sampling or SamplingConfig())
    stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.int64)
    B = len(prompts)
    out = []  # one (B,) tensor per step: memory grows with what is generated, not with what was asked
    done = torch.zeros(B, dtype=torch.bool)
    n_out = torch.zeros(B, dtype=torch.int64)

    runner.synchronize()
    t0 = time.perf_counter()
    logits, state = runner.prefill(ids, lengths)
    check_finite(logits, "prefill")
    token = sampler(logits)
    runner.synchronize()
    prefill_s = time.perf_counter() - t0
    steps = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=max_new_tokens, desc="decode", unit="tok", leave=False)
    t1 = time.perf_counter()
    for i in range(max_new_tokens):
        tok_cpu = token.cpu()
        out.append(torch.where(done, torch.zeros_like(tok_cpu), tok_cpu))
        n_out += (~done).long()
        if len(stop):
            done |= torch.isin(tok_cpu, stop)
        if bar is not None:
            bar.update(1)
        if i == max_new_tokens - 1 or bool(done.all()):
            break
        ts = time.perf_counter()
        logits, state = runner.step(token, state)
        check_finite(logits, f"decode step {i + 1}")
        token = sampler(logits)
        runner.synchronize()
        steps.append(time.perf_counter() - ts)
    decode_s = time.perf_counter() - t1
    if bar is not None:
        bar.close()
    table = torch.stack(out, 1)
    tokens = [table[b, : int(n_out[b])].tolist() for b in range(B)]
    return GenerationResult(tokens, lengths.tolist(), prefill_s, decode_s, steps)
