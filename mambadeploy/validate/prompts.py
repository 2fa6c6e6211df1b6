"""The prompts validate feeds every backend: seeded random token ids, or a file of token ids.

File formats: JSON (a list of lists of ints, or {"prompts": [[...], ...]}), or text with one prompt per line, ids
separated by spaces or commas (blank lines and lines starting with # are skipped).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import InputError


def random_prompts(vocab_size: int, num_prompts: int, prompt_len: int, seed: int = 0) -> list[list[int]]:
    if num_prompts < 1 or prompt_len < 1:
        raise InputError(f"--num-prompts and --prompt-len must be >= 1, got {num_prompts} and {prompt_len}")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_prompts, prompt_len), generator=g).tolist()


def load_prompts(path, vocab_size: int) -> list[list[int]]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompts file {path} does not exist")
    text = path.read_text()
    prompts = _parse_json(path, text) if text.lstrip().startswith(("[", "{")) else _parse_lines(path, text)
    if not prompts:
        raise InputError(f"prompts file {path} holds no prompts")
    for i, p in enumerate(prompts):
        if not p:
            raise InputError(f"prompts file {path}: prompt {i} is empty")
        bad = sorted({t for t in p if not 0 <= t < vocab_size})
        if bad:
            raise InputError(f"prompts file {path}: prompt {i} has token id(s) {bad[:5]} outside the model's "
                             f"vocabulary [0, {vocab_size})")
    return prompts


def _parse_json(path: Path, text: str) -> list[list[int]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"prompts file {path}: not valid JSON ({exc})") from exc
    if isinstance(data, dict):
        data = data.get("prompts")
    if not isinstance(data, list) or not all(isinstance(p, list) for p in data):
        raise InputError(f"prompts file {path}: expected a list of lists of token ids (or {{\"prompts\": [...]}})")
    for i, p in enumerate(data):
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            raise InputError(f"prompts file {path}: prompt {i} holds something other than integer token ids")
    return data


def _parse_lines(path: Path, text: str) -> list[list[int]]:
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            prompts.append([int(t) for t in line.replace(",", " ").split()])
        except ValueError as exc:
            raise InputError(f"prompts file {path}, line {n}: not a list of integer token ids ({exc})") from exc
    return prompts
