"""Shared by the loaders: put a {our_name: tensor} mapping into a model, checking every key and shape first.

Two ways in:
- `assign_weights(model, weights)`: the checkpoint already uses our parameter names (native format).
- `load_pieces(model, pieces, available, read)`: foreign formats. Each of our parameters is a `Piece` built from one or
  more source tensors (e.g. 8 experts' fc1 stacked into one (E, 2F, d) tensor). Keys and shapes are checked in the
  *source* names first, from the file headers alone, so the error names what the user sees in their checkpoint; then
  tensors are read one parameter at a time (peak memory: the model plus one parameter, not a second full copy).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import CheckpointError, read_json


def raise_key_problems(source: str, missing, extra, shapes) -> None:
    """One CheckpointError listing every missing, unexpected and mis-shaped key (nothing if all lists are empty)."""
    if not (missing or extra or shapes):
        return
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_first(missing, ', ')}")
    if extra:
        parts.append(f"unexpected keys ({len(extra)}): {_first(extra, ', ')}")
    if shapes:
        parts.append(f"mis-shaped keys ({len(shapes)}): {_first(shapes, '; ')}")
    raise CheckpointError(f"{source}: " + " | ".join(parts))


def _first(items, sep: str, n: int = 4) -> str:
    """The first n items and a count of the rest: a wrong d_model mis-shapes every tensor (one 1,126-character line)."""
    return sep.join(items[:n]) + (f"{sep}... and {len(items) - n} more" if len(items) > n else "")


def assign_weights(model, weights: dict, source: str, unexpected: list[str] | None = None) -> None:
    """Copy `weights` (our parameter names) into `model`. Missing, unexpected and mis-shaped keys are all listed in one
    CheckpointError. `unexpected` carries source keys the caller could not map."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(weights))
    extra = sorted(set(unexpected or []) | (set(weights) - set(params)))
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(params[k].shape)}"
        for k, v in weights.items() if k in params and tuple(v.shape) != tuple(params[k].shape)
    ]
    raise_key_problems(source, missing, extra, shapes)
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v)


def _single(tensors):
    return tensors[0]


@dataclass
class Piece:
    """One of our parameters, built from `sources` (checkpoint keys, each expected to have the matching entry of
    `shapes`) by `combine(list of tensors) -> tensor` (default: the one source as it is)."""

    sources: list[str]
    shapes: list[tuple]
    combine: Callable = _single


def load_pieces(model, pieces: dict[str, Piece], available: dict[str, tuple], read: Callable[[str], torch.Tensor],
                source: str, ignored=()) -> None:
    """Fill every parameter of `model` from a checkpoint.

    pieces: our parameter name -> Piece; available: checkpoint key -> shape (from the header, nothing read);
    read: checkpoint key -> tensor; ignored: checkpoint keys that may be present and are deliberately unused.
    All problems are listed at once, in checkpoint key names, before anything is copied.
    """
    params = dict(model.named_parameters())
    unplanned = sorted(set(params) - set(pieces))
    if unplanned:  # a loader bug, not a checkpoint problem: say so plainly
        raise CheckpointError(f"{source}: internal error, no source planned for parameters {unplanned}")
    check_pieces(pieces, available, source, ignored)
    from tqdm import tqdm

    # a bar over the tensors for big checkpoints (a 1.5B model took 21 s without a sign of life); none on a non-TTY
    big = sum(p.numel() for p in params.values()) > (1 << 27)
    with torch.no_grad():
        for name, piece in tqdm(pieces.items(), desc=f"loading {Path(str(source)).name}", unit="tensor", leave=False,
                                disable=None if big else True):
            tensor = piece.combine([read(k) for k in piece.sources])
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise CheckpointError(f"{source}: internal error, {name} built as {tuple(tensor.shape)}, "
                                      f"model has {tuple(params[name].shape)}")
            params[name].copy_(tensor)


def check_pieces(pieces: dict[str, Piece], available: dict[str, tuple], source: str, ignored=()) -> None:
    """Every source key of every piece present with its expected shape, and no unplanned key (except `ignored`):
    all problems in one CheckpointError, in checkpoint key names, from the headers alone."""
    missing, shapes, used = [], [], set()
    for piece in pieces.values():
        for key, shape in zip(piece.sources, piece.shapes):
            used.add(key)
            if key not in available:
                missing.append(key)
            elif tuple(available[key]) != tuple(shape):
                shapes.append(f"{key}: checkpoint {tuple(available[key])} vs expected {tuple(shape)}")
    extra = sorted(set(available) - used - set(ignored))
    raise_key_problems(source, sorted(missing), extra, shapes)


def read_json_config(directory, config_from_json: Callable):
    """config.json of a checkpoint directory through a format's `config_from_json(data, where)`; bad JSON is one error."""
    cfg = Path(directory) / "config.json"
    return config_from_json(read_json(cfg, CheckpointError), str(cfg))
