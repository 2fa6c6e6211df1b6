"""The numerics of one backend against the fp32 reference, on the same prompts.

The reference runs once: greedy decoding, keeping its logits at prefill and at every decode step (a ReferenceTrace).
Each backend then runs twice:
- teacher-forced: fed the reference's own tokens, so its logits at every step are comparable one to one (errors per step,
  top-1 agreement) even after the two would have chosen different tokens;
- free-running greedy: its own tokens (exact match rate, first divergence), timed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..runtime.base import Runner
from ..runtime.generate import check_finite, check_vocab, generate, pad_prompts
from .metrics import logit_errors, worst


@dataclass
class ReferenceTrace:
    prompts: list[list[int]]
    ids: torch.Tensor  # (B, L) left-padded
    lengths: torch.Tensor  # (B,)
    tokens: torch.Tensor  # (B, T) greedy tokens
    logits: list[torch.Tensor]  # T x (B, V) fp32 on CPU: prefill, then each decode step
    states: dict = field(default_factory=dict)  # "prefill" / "final" -> {name: fp32 CPU tensor} (per-layer only)


def _cpu_state(runner: Runner, state) -> dict:
    """A copy: runners may reuse their state buffers in place on the next step."""
    return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in runner.state_to_torch(state).items()}


def _bar(total: int, desc: str, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tok", leave=False, disable=not progress)


@torch.no_grad()
def trace_reference(runner: Runner, prompts, new_tokens: int, keep_states=False, progress=False) -> ReferenceTrace:
    check_vocab(prompts, runner.config.vocab_size)
    ids, lengths = pad_prompts(prompts)
    logits, state = runner.prefill(ids, lengths)
    check_finite(logits, "the reference (torch fp32), prefill")
    all_logits, tokens, states = [logits.float().cpu()], [], {}
    if keep_states:
        states["prefill"] = _cpu_state(runner, state)
    with _bar(new_tokens, "reference", progress) as bar:
        for t in range(new_tokens):
            token = all_logits[-1].argmax(-1)
            tokens.append(token)
            bar.update(1)
            if t == new_tokens - 1:
                break
            logits, state = runner.step(token, state)
            check_finite(logits, f"the reference (torch fp32), decode step {t + 1}")
            all_logits.append(logits.float().cpu())
    if keep_states:
        states["final"] = _cpu_state(runner, state)
    return ReferenceTrace(prompts, ids, lengths, torch.stack(tokens, 1), all_logits, states)


@torch.no_grad()
def teacher_forced(runner: Runner, ref: ReferenceTrace, keep_states=False, progress=False, label="") -> dict:
    """Feed the reference's tokens. Returns per-step logit errors (step 0 = prefill), top-1 agreement over every
    (row, step) position, and (keep_states) the states after prefill and after the last step."""
    logits, state = runner.prefill(ref.ids, ref.lengths)
    steps, agree, states = [], 0, {}
    if keep_states:
        states["prefill"] = _cpu_state(runner, state)
    T = ref.tokens.shape[1]
    with _bar(T, f"{label} teacher-forced", progress) as bar:
        for t in range(T):
            check_finite(logits, f"{label or 'backend'}, " + (f"decode step {t}" if t else "prefill"))
            logits = logits.float().cpu()
            steps.append({"step": t, **logit_errors(logits, ref.logits[t])})
            agree += int((logits.argmax(-1) == ref.tokens[:, t]).sum())
            bar.update(1)
            if t < T - 1:
                logits, state = runner.step(ref.tokens[:, t], state)
    if keep_states:
        states["final"] = _cpu_state(runner, state)
    positions = ref.tokens.numel()
    return {
        "prefill": {k: v for k, v in steps[0].items() if k != "step"},
        "decode_steps": steps[1:],
        "worst": worst(steps),
        "top1_agreement": agree / positions,
        "positions": positions,
        "states": states,
    }


@torch.no_grad()
def free_greedy(runner: Runner, ref: ReferenceTrace, prefill_repeats: int = 3, progress=False) -> dict:
    """The backend's own greedy generation: token agreement with the reference, and its timings."""
    T = ref.tokens.shape[1]
    result = generate(runner, ref.prompts, T, progress=progress)
    tokens = torch.tensor(result.tokens, dtype=torch.int64)
    same = tokens == ref.tokens
    first_per_row = [int((~row).nonzero()[0]) if not bool(row.all()) else None for row in same]
    diverged = [p for p in first_per_row if p is not None]
    prefill_s = [result.prefill_s]
    for _ in range(max(prefill_repeats - 1, 0)):  # prefill is one call: repeat it for a steadier figure
        runner.synchronize()
        t0 = time.perf_counter()
        runner.prefill(ref.ids, ref.lengths)
        runner.synchronize()
        prefill_s.append(time.perf_counter() - t0)
    return {
        "token_match_rate": float(same.float().mean()),
        "first_divergence": min(diverged) if diverged else None,
        "first_divergence_per_row": first_per_row,
        "tokens": tokens.tolist(),
        "prefill_s": prefill_s,
        "step_s": result.step_s,
    }
