"""Shared helper of the runtime tests: two runners stepping the same tokens, compared after every step."""

from __future__ import annotations


def follow_greedy(lead, other, prompt, steps: int, compare):
    """lead and other prefill prompt, then both take lead's greedy token `steps` times; compare(other's logits,
    lead's logits) after each step. -> (lead's state, other's state)."""
    (la, sa), (lb, sb) = lead.prefill(prompt), other.prefill(prompt)
    for _ in range(steps):
        token = la.argmax(-1)
        la, sa = lead.step(token, sa)
        lb, sb = other.step(token, sb)
        compare(lb, la)
    return sa, sb
