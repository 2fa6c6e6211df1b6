"""`mambadeploy build EXPORT_DIR --out ENGINE_DIR`: TensorRT (or TensorRT-RTX) engines for prefill and decode.

--target trt needs TensorRT >= 10.6 and a CUDA GPU; --target rtx builds TensorRT-RTX plans, which works without a GPU
(plans then run only on the RTX-supported GPUs: compute capability 8.0, 8.6, 8.9, 12.x — not on an H100).
"""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("export_dir", help="export directory (manifest.json, prefill.onnx, decode.onnx)")
    p.add_argument("--out", required=True, help="engine directory to write (created if missing)")
    p.add_argument("--target", choices=("trt", "rtx"), default="trt",
                   help="trt: TensorRT (GPU needed); rtx: TensorRT-RTX (builds on CPU too)")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--fp16", dest="precision", action="store_const", const="fp16",
                      help="expect / build fp16 (an fp32 export is lowered with TensorRT's FP16 flag, target trt only)")
    prec.add_argument("--bf16", dest="precision", action="store_const", const="bf16", help="as --fp16, for bf16")
    p.add_argument("--max-batch", type=int, default=8, help="largest batch the engines accept (default 8)")
    p.add_argument("--max-prompt", type=int, default=512, help="longest prompt the prefill engine accepts (default 512)")
    p.add_argument("--opt-batch", type=int, default=None, help="batch to tune for (default max-batch/2)")
    p.add_argument("--opt-prompt", type=int, default=None, help="prompt length to tune for (default max-prompt/4)")
    p.add_argument("--rtx-arch", default=None,
                   help="TensorRT-RTX compute capabilities to build for, e.g. SM89,SM120 (default: all it supports)")
    p.add_argument("--force", action="store_true", help="rebuild even when the fingerprint says the engine is current")


def run(args) -> int:
    from ..trt.build import build_engines

    caps = [c.strip().upper() for c in args.rtx_arch.split(",")] if args.rtx_arch else None
    manifest = build_engines(args.export_dir, args.out, target=args.target, precision=args.precision,
                             max_batch=args.max_batch, max_prompt=args.max_prompt, opt_batch=args.opt_batch,
                             opt_prompt=args.opt_prompt, compute_capabilities=caps, force=args.force,
                             progress=lambda msg: print(msg, flush=True))
    for graph, rec in manifest["engines"].items():
        print(f"{graph}.engine: {rec['bytes']} bytes, fingerprint {rec['fingerprint'][:12]}")
    if args.target == "rtx":
        print("note: TensorRT-RTX plans run only on GPUs of compute capability 8.0/8.6/8.9/12.x")
    return 0
