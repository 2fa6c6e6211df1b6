"""`mambadeploy validate MODEL`: every backend that runs here against the fp32 torch reference — logits errors per step,
greedy token agreement, teacher-forced top-1 agreement, optional per-layer drift, latency and roofline — as a console
table, JSON (--json) and an HTML report (--report). Exit code 0 when every backend that ran is within tolerance, 1 when
one is not (or none ran), 2 on bad input."""

from __future__ import annotations

import sys


def add_arguments(p) -> None:
    p.add_argument("model", help="preset name or checkpoint directory (the fp32 torch reference is built from it)")
    p.add_argument("--export", dest="export_dir", metavar="DIR",
                   help="export directory for the ONNX backends (checked against MODEL; made here when it does not "
                        "exist); default: export MODEL to a temporary directory")
    p.add_argument("--backends", metavar="LIST",
                   help="comma-separated name[:dtype] from torch, torch-fast, ort-cpu, ort-cuda, trt (e.g. "
                        "torch,torch:bf16,ort-cpu); default: every backend, those that cannot run here skipped")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"),
                   help="compute dtype of backends named without one (default fp32; the reference is always fp32)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="device of the torch reference and torch backend "
                   "(default: cuda when visible)")
    p.add_argument("--prompts", dest="prompts_file", metavar="FILE",
                   help="token ids: JSON list of lists, or one prompt per line (instead of random prompts)")
    p.add_argument("--num-prompts", type=int, metavar="N", help="random prompts (the batch; default 2)")
    p.add_argument("--prompt-len", type=int, metavar="L", help="tokens per random prompt (default 16)")
    p.add_argument("--new-tokens", type=int, default=32, metavar="T", help="tokens generated per prompt (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--max-context", type=int, metavar="N", help="KV-cache slots per sequence of the attention layers, allocated up front (default: the checkpoint's "
                   "context, e.g. Jamba's max_position_embeddings; no effect without attention)")
    p.add_argument("--prefill-chunk", type=int, metavar="N", help="torch-fast prefill chunk in tokens (8192): long "
                   "prompts are prefilled in chunks, so memory follows the chunk")
    p.add_argument("--per-layer", action="store_true", help="hidden-state and state-tensor drift layer by layer")
    p.add_argument("--ops", choices=("portable", "custom", "contrib", "standard"), help="op set of the export validate makes itself")
    p.add_argument("--no-cache", action="store_true", help="export to a temporary directory instead of reusing / "
                   "filling the export cache ($MAMBADEPLOY_CACHE or ~/.cache/mambadeploy, shared with `generate`)")
    p.add_argument("--prefill-repeats", type=int, default=3, metavar="R", help="prefill timings taken (median reported)")
    p.add_argument("--time-limit", type=float, metavar="S", help="start no backend after S seconds of backend runs "
                   "(those are reported as skipped): keeps a CI job or a device call inside its limit")
    p.add_argument("--json", dest="json_out", metavar="OUT.json", help="write the result (schema: "
                   "mambadeploy/validate/result.schema.json)")
    p.add_argument("--report", metavar="OUT.html", help="write a self-contained HTML report with plots")
    p.add_argument("--parallel", default="tp=2", metavar="SPEC",
                   help="layout of the `parallel` backend: tp=N,ep=M[,world=W][,dispatch=auto|mask|alltoall] (tp=2)")
    p.add_argument("--parallel-kernels", choices=("torch", "triton"), default="torch",
                   help="decode of the `parallel` backend: the sharded reference (torch) or torch-fast's Triton step "
                        "with the collectives in its CUDA graph (triton)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")


def run(args) -> int:
    from ..errors import InputError
    from ..validate.harness import ValidateOptions, run_validation
    from ..validate.output import write_json, write_report

    if args.prompts_file and (args.num_prompts is not None or args.prompt_len is not None):
        raise InputError("give either --prompts FILE or --num-prompts/--prompt-len, not both")

    opts = ValidateOptions(
        model=args.model, export_dir=args.export_dir, backends=args.backends, dtype=args.dtype, device=args.device,
        prompts_file=args.prompts_file, num_prompts=2 if args.num_prompts is None else args.num_prompts,
        prompt_len=16 if args.prompt_len is None else args.prompt_len,
        new_tokens=args.new_tokens, seed=args.seed, per_layer=args.per_layer, prefill_repeats=args.prefill_repeats,
        ops=args.ops, use_cache=not args.no_cache, max_context=args.max_context, prefill_chunk=args.prefill_chunk,
        time_limit_s=args.time_limit, progress=not args.quiet and sys.stderr.isatty(),
        parallel=args.parallel, parallel_kernels=args.parallel_kernels,
    )
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    result = run_validation(opts, log=log)
    from ..validate.console import render

    render(result)
    if args.json_out:
        write_json(result, args.json_out)
        log(f"wrote {args.json_out}")
    if args.report:
        write_report(result, args.report)
        log(f"wrote {args.report}")
    return 0 if result["passed"] else 1
