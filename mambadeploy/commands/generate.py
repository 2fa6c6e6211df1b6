"""`mambadeploy generate MODEL`: generate tokens with any backend (runtime.factory) and report tokens/s.

Prompts are token ids (`--prompt-ids 1,2,3`) or text (`--prompt TEXT --tokenizer tokenizer.json`, a local file read
with the `tokenizers` library); repeat either flag for a batch of prompts of different lengths (left-padded).
"""

from __future__ import annotations

import json
import time


def add_arguments(parser) -> None:
    from ..runtime.factory import BACKENDS

    parser.add_argument("model", help="preset name, checkpoint directory, or a backend's artifact directory")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt-ids", action="append", metavar="IDS",
                         help="comma-separated token ids, e.g. 1,2,3; repeat for a batch")
    prompts.add_argument("--prompt", action="append", metavar="TEXT", help="text prompt (needs --tokenizer); repeat for a batch")
    parser.add_argument("--tokenizer", metavar="tokenizer.json", help="local tokenizer.json (encodes --prompt, decodes output), or `bytes` (UTF-8 bytes as ids)")
    parser.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="tokens to generate per prompt (32)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--backend", default="torch", help=f"one of: {', '.join(BACKENDS)} (torch)")
    parser.add_argument("--provider", choices=("cpu", "cuda"),
                        help="ONNX Runtime provider for --backend ort (default: from --device)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads for torch (default: torch's choice); 1 is often fastest for tiny models on a "
                             "busy machine")
    parser.add_argument("--max-context", type=int, metavar="N", help="KV-cache slots per sequence of the attention layers, allocated up front (default: the checkpoint's "
                   "context, e.g. Jamba's max_position_embeddings; no effect without attention)")
    parser.add_argument("--prefill-chunk", type=int, metavar="N",
                        help="torch-fast: prompt tokens per prefill chunk (8192)")
    parser.add_argument("--kv-dtype", choices=("model", "fp8"),
                        help="torch-fast: KV cache element type (model: the model dtype; fp8: e4m3)")
    parser.add_argument("--stop-ids", metavar="IDS", help="comma-separated token ids that end a sequence")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--parallel", metavar="SPEC",
                        help="tensor / expert parallel run (implies --backend parallel): tp=N,ep=M[,world=W]"
                             "[,dispatch=auto|mask|alltoall]; under torchrun one rank per process (rank 0 prints), "
                             "else W workers are spawned here")
    parser.add_argument("--parallel-kernels", choices=("torch", "triton"), default="torch",
                        help="parallel decode on the sharded reference model (torch, graphed on CUDA) or on torch-fast's "
                             "Triton kernels with the collectives in its CUDA graph (triton; GPU)")
    parser.add_argument("--parallel-timeout", type=float, default=None, metavar="S",
                        help="collective timeout: a dead or hung rank ends the run with an error after S s (120)")


def parse_ids(text: str, flag: str) -> list[int]:
    from ..errors import InputError

    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise InputError(f"{flag} {text!r}: expected comma-separated integer token ids, e.g. 1,2,3") from None


class ByteTokenizer:
    """`--tokenizer bytes`: UTF-8 bytes as token ids (the byte-level trained testbed, models/trained)."""

    class _Encoding:
        def __init__(self, ids):
            self.ids = ids

    def encode(self, text: str):
        return self._Encoding(list(text.encode("utf-8")))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def get_vocab_size(self) -> int:
        return 256


def load_tokenizer(path: str):
    from ..errors import InputError, lazy_import

    if path == "bytes":
        return ByteTokenizer()

    tokenizers = lazy_import("tokenizers", why="--tokenizer")
    try:
        return tokenizers.Tokenizer.from_file(path)
    except Exception as exc:  # the Rust side raises plain Exception subclasses
        raise InputError(f"{path}: cannot load tokenizer ({exc})") from exc


def run(args) -> int:
    from ..errors import InputError
    from ..runtime.factory import make_runner
    from ..runtime.generate import generate
    from ..runtime.sampling import SamplingConfig

    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    if args.prompt is not None:
        if tokenizer is None:
            raise InputError("--prompt needs --tokenizer tokenizer.json (or give token ids with --prompt-ids)")
        prompts = [tokenizer.encode(text).ids for text in args.prompt]
    else:
        prompts = [parse_ids(text, "--prompt-ids") for text in args.prompt_ids]
    stop = parse_ids(args.stop_ids, "--stop-ids") if args.stop_ids else []
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)

    if args.threads is not None:
        if args.threads < 1:
            raise InputError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    options = {"provider": args.provider} if args.provider else {}
    options.update({k: v for k, v in (("max_context", args.max_context), ("prefill_chunk", args.prefill_chunk),
                                      ("kv_dtype", args.kv_dtype)) if v is not None})
    is_main = True
    if args.parallel and args.backend not in ("torch", "parallel"):
        raise InputError(f"--parallel runs the parallel backend; it cannot be combined with --backend {args.backend}")
    if args.parallel or args.backend == "parallel":
        from ..parallel.launch import make_parallel_runner

        timeout = {} if args.parallel_timeout is None else {"timeout_s": args.parallel_timeout}
        runner, is_main = make_parallel_runner(args.model, args.parallel or "tp=2", args.dtype, args.device,
                                               kernels=args.parallel_kernels, **timeout)
    else:
        runner = make_runner(args.model, backend=args.backend, dtype=args.dtype, device=args.device, **options)
    load_s = time.perf_counter() - t0
    result = generate(runner, prompts, args.max_new_tokens, sampling=sampling, stop_tokens=stop)

    total_s = result.prefill_s + result.decode_s
    timings = {"load_s": load_s, "prefill_s": result.prefill_s, "decode_s": result.decode_s,
               "new_tokens": result.new_tokens, "decode_tokens_per_s": result.decode_tokens_per_s,
               "tokens_per_s": result.new_tokens / total_s if total_s > 0 else float("nan")}
    if not is_main:  # torchrun: the other ranks ran the same calls; rank 0 reports
        return 0
    rows = []
    for prompt, tokens in zip(prompts, result.tokens):
        row = {"prompt_ids": prompt, "tokens": tokens}
        if tokenizer is not None:
            row["text"] = tokenizer.decode(tokens)
        rows.append(row)
    if args.json:
        print(json.dumps({"model": args.model, "runner": runner.describe(), "batch": len(prompts),
                          "max_new_tokens": args.max_new_tokens, "threads": args.threads, "sampling": vars(sampling),
                          "stop_ids": stop, "prompts": rows, "timings": timings}))
        return 0
    d = runner.describe()
    print(f"model {args.model} | backend {d.get('backend')} | device {d.get('device')} | dtype {d.get('dtype')}")
    for i, row in enumerate(rows):
        print(f"[{i}] prompt {len(row['prompt_ids'])} tokens -> {len(row['tokens'])} new: "
              + " ".join(map(str, row["tokens"])))
        if "text" in row:
            print(f"    text: {row['text']!r}")
    print(f"prefill {timings['prefill_s'] * 1e3:.1f} ms | decode {timings['decode_s'] * 1e3:.1f} ms | "
          f"{timings['decode_tokens_per_s']:.1f} decode tokens/s | {timings['tokens_per_s']:.1f} tokens/s overall "
          f"(batch {len(prompts)}, {result.new_tokens} new tokens)")
    return 0
