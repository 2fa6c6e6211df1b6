"""`mambadeploy export MODEL --out DIR`: ONNX graphs (prefill.onnx, decode.onnx) + manifest.json for ONNX Runtime and
TensorRT. See export/exporter.py for what is written and how."""

from __future__ import annotations

import json
import sys
import time


def add_arguments(parser) -> None:
    from ..export.descriptions import DEFAULT_OPSET, OPS_MODES

    parser.add_argument("model", help="preset name or checkpoint directory")
    parser.add_argument("--out", required=True, metavar="DIR", help="export directory to write (must not exist)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="graph dtype (fp32)")
    parser.add_argument("--ops", default="portable", choices=OPS_MODES,
                        help="portable: standard ONNX ops only (Scan for the recurrence; runs in any ONNX Runtime); "
                             "custom: our nodes in domain mambadeploy (prefill scan / conv / expert gather, decode conv "
                             "and state update, add + RMSNorm, routed MoE; for the ORT custom ops and TensorRT "
                             "plugins); contrib: ONNX Runtime's com.microsoft CausalConvWithState and MoE where they "
                             "fit; standard: opset 27's LinearAttention and CausalConvWithState for the Mamba layers "
                             "(onnxruntime >= 1.32) (default: portable)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, metavar="N", help=f"ONNX opset ({DEFAULT_OPSET})")
    parser.add_argument("--max-batch", type=int, metavar="N", help="largest batch the graphs accept (256)")
    parser.add_argument("--max-context", type=int, metavar="N", help="KV-cache slots per sequence of the attention layers, allocated up front (default: the checkpoint's "
                   "context, e.g. Jamba's max_position_embeddings; no effect without attention)")
    parser.add_argument("--prefill-state", action="store_true",
                        help="also write prefill_state.onnx: a prompt chunk continuing an incoming state (chunked "
                             "prefill of long prompts)")
    parser.add_argument("--force", action="store_true", help="replace DIR if it is an existing export")
    parser.add_argument("--quiet", action="store_true", help="no progress messages")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run(args) -> int:
    from pathlib import Path

    from ..export import require_export_dependencies

    require_export_dependencies()
    from ..export.exporter import check_target, export_model, weight_bytes
    from ..models.checkpoint import load_model

    def say(msg):
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    check_target(Path(args.out), args.force)  # before loading: a full-size model takes a while to build
    t0 = time.perf_counter()
    say(f"loading {args.model} ({args.dtype})")
    model = load_model(args.model, dtype=args.dtype, device="cpu", max_context=args.max_context)
    load_s = time.perf_counter() - t0
    manifest = export_model(model, args.out, ops=args.ops, opset_version=args.opset, max_batch=args.max_batch,
                            force=args.force, progress=say, prefill_state=args.prefill_state)
    total_s = time.perf_counter() - t0
    out = Path(args.out)
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    summary = {"out": str(out), "family": manifest.family, "dtype": manifest.dtype, "ops": manifest.ops,
               "opset": manifest.opset, "limits": manifest.limits, "files": files,
               "weight_bytes": weight_bytes(model), "load_s": round(load_s, 2),
               "export_s": round(total_s - load_s, 2), "total_s": round(total_s, 2),
               "peak_rss_bytes": _peak_rss_bytes()}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"exported {args.model} -> {out} ({manifest.family}, {manifest.dtype}, {manifest.ops} ops, opset "
          f"{manifest.opset}) in {summary['export_s']:.1f} s (+{load_s:.1f} s loading)")
    for name, size in files.items():
        print(f"  {name:24s} {size / 2**20:10.2f} MiB")
    print(f"peak RSS {summary['peak_rss_bytes'] / 2**30:.2f} GiB for {summary['weight_bytes'] / 2**30:.2f} GiB of "
          "weights")
    return 0
