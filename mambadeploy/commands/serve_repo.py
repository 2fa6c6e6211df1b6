"""`mambadeploy serve-repo MODEL|EXPORT|ENGINE --out REPO`: write a Triton Inference Server model repository
(serve/repo.py): the in-flight-batching Python-backend model, and (from an export or engine directory, or with
--state-config) the decode graph under Triton's sequence batcher with implicit state."""

from __future__ import annotations


def add_arguments(parser) -> None:
    from ..runtime.factory import BACKENDS

    parser.add_argument("model", help="preset name, checkpoint directory, export directory (ort) or engine directory (trt)")
    parser.add_argument("--out", required=True, metavar="REPO", help="model repository directory to write")
    parser.add_argument("--name", default="mamba", help="model name in the repository (mamba)")
    parser.add_argument("--backend", help=f"one of: {', '.join(BACKENDS)} (default: ort for an export, trt for "
                                          "engines, else torch-fast on CUDA or torch on CPU)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--device", help="cpu or cuda[:N] (default: cuda for torch-fast / trt / ort-cuda, else cpu)")
    parser.add_argument("--max-batch", type=int, default=64, metavar="N",
                        help="state slots = most sequences decoded together (64)")
    parser.add_argument("--tokenizer", metavar="tokenizer.json", help="copied into the repository: text_input / "
                                                                      "text_output")
    parser.add_argument("--threads", type=int, metavar="N", help="torch CPU threads inside the server")
    parser.add_argument("--response-interval-ms", type=float, default=0.0, metavar="MS",
                        help="at most one streamed response per sequence per MS (its tokens gather in between): "
                             "fewer, larger responses under load; 0 (default): each as soon as the sender is free")
    state = parser.add_mutually_exclusive_group()
    state.add_argument("--state-config", dest="state_config", action="store_true", default=None,
                       help="also write the implicit-state decode model (exports a preset/checkpoint first)")
    state.add_argument("--no-state-config", dest="state_config", action="store_false")


def default_backend(model) -> str:
    import torch

    from ..runtime.factory import directory_kind

    kind = directory_kind(model)
    if kind == "export":
        return "ort"
    if kind == "engines":
        return "trt"
    return "torch-fast" if torch.cuda.is_available() else "torch"


def run(args) -> int:
    from pathlib import Path

    from ..errors import InputError
    from ..serve.repo import write_repo

    backend = args.backend or default_backend(args.model)
    device = args.device or ("cuda" if backend in ("torch-fast", "trt", "ort-cuda") else "cpu")
    if args.tokenizer and not Path(args.tokenizer).is_file():
        raise InputError(f"--tokenizer {args.tokenizer}: no such file")
    written = write_repo(args.model, args.out, name=args.name, backend=backend, dtype=args.dtype, device=device,
                         max_batch=args.max_batch, tokenizer=args.tokenizer, threads=args.threads,
                         state_config=args.state_config, response_interval_ms=args.response_interval_ms)
    for name, directory in written.items():
        print(f"{name}: {directory}")
    print(f"serve it: mambadeploy serve {args.out}")
    return 0
