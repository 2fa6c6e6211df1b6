"""`mambadeploy calibrate MODEL --data FILE --sparsity 0.5 --out DIR`: SCAP activation sparsity (arXiv 2412.07174).

Per sparsified linear input: a mode (0, median or KDE peak; `auto` picks the least output error), a threshold (the
target-quantile of |x − mode| over the calibration windows) and the mode folded into the bias. Writes a checkpoint in
our format that load_model, generate, export, validate and inspect take like any other.
"""

from __future__ import annotations

import json
from pathlib import Path

BYTE_VOCAB = 256


def add_arguments(parser) -> None:
    from ..models.calibrate import MODES
    from ..models.sparsity import DEFAULT_GROUPS, GROUPS

    parser.add_argument("model", help="preset name or dense checkpoint directory")
    parser.add_argument("--data", required=True, metavar="FILE", help="calibration text (UTF-8)")
    parser.add_argument("--tokenizer", metavar="tokenizer.json",
                        help="local tokenizer.json; without it the text is read as bytes (models with a 256-id vocab)")
    parser.add_argument("--sparsity", type=float, default=0.5, help="target share of zeroed inputs, in [0, 1) (0.5)")
    parser.add_argument("--layers", default=",".join(DEFAULT_GROUPS),
                        help="comma-separated: " + "; ".join(f"{k}: {v}" for k, v in GROUPS.items()))
    parser.add_argument("--mode", default="auto", choices=MODES, help="mode-centering (auto: least output error)")
    parser.add_argument("--samples", type=int, default=64, help="calibration windows (64, as the paper)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window (256, as the paper)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the row subsample")
    parser.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to write")
    parser.add_argument("--json", action="store_true", help="print the sparsity config as JSON")


def tokenize(path: str, tokenizer_path: str | None, vocab_size: int):
    """The calibration file as a 1-D int64 tensor of token ids, checked against the model's vocabulary."""
    import torch

    from ..errors import InputError
    from .generate import load_tokenizer

    file = Path(path)
    if not file.is_file():
        raise InputError(f"--data {path}: no such file")
    raw = file.read_bytes()
    if not raw.strip():
        raise InputError(f"--data {path}: the file is empty")
    if tokenizer_path is None:
        if vocab_size != BYTE_VOCAB:
            raise InputError(f"the model's vocabulary has {vocab_size} ids, not {BYTE_VOCAB} bytes: give --tokenizer "
                             "tokenizer.json")
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.get_vocab_size() > vocab_size:
        raise InputError(f"{tokenizer_path}: the tokenizer's vocabulary ({tokenizer.get_vocab_size()} ids) does not "
                         f"match the model's ({vocab_size} ids)")
    ids = tokenizer.encode(raw.decode("utf-8", errors="replace")).ids
    if not ids:
        raise InputError(f"--data {path}: no tokens after tokenization")
    return torch.tensor(ids, dtype=torch.long)


def run(args) -> int:
    import torch

    from ..errors import InputError
    from ..models import calibrate as scap
    from ..models.checkpoint import load_model, save_model

    groups = [g.strip() for g in args.layers.split(",") if g.strip()]
    if not 0.0 <= args.sparsity < 1.0:  # before loading anything
        raise InputError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    model = load_model(args.model, dtype="fp32", device="cpu")
    scap.check_request(model, args.sparsity, groups, args.mode)
    tokens = tokenize(args.data, args.tokenizer, model.config.vocab_size)
    windows = scap.windows_from_tokens(tokens, args.samples, args.seq_len)
    with torch.inference_mode(False):
        sparse = scap.calibrate(model, windows, args.sparsity, groups, args.mode, seed=args.seed)
    out = save_model(sparse, args.out)
    if args.json:
        print(json.dumps(sparse.config.sparsity, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"SCAP calibration -> {out} (target {args.sparsity}, {tuple(windows.shape)} tokens)")
    for col in ("site", "mode", "m", "threshold"):
        table.add_column(col)
    for site, s in sparse.config.sparsity["sites"].items():
        table.add_row(site, s["mode_kind"], f"{s['mode']:.4g}", f"{s['threshold']:.4g}")
    Console().print(table)
    return 0
