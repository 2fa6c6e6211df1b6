"""The one command: `mambadeploy <subcommand>`. Each subcommand lives in mambadeploy/commands/<name>.py with
`add_arguments(parser)` and `run(args) -> int`, imported only when chosen, so a missing optional backend never breaks the
CLI. Errors a user can act on (MambaDeployError) print one line, exit code 2."""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import MambaDeployError

# name -> one-line help; the module mambadeploy.commands.<name> implements it
COMMANDS = {
    "inspect": "describe a model (preset, checkpoint) or an export directory",
    "generate": "generate tokens from a model, an export directory (ORT) or an engine directory",
    "export": "export a model to ONNX (prefill + decode graphs, manifest.json) for ONNX Runtime and TensorRT",
    "build": "build TensorRT / TensorRT-RTX engines (prefill + decode) from an export directory",
    "calibrate": "SCAP: calibrate activation sparsity (mode + threshold per linear input) into a sparse checkpoint",
    "validate": "check every backend against the fp32 torch reference: logits, tokens, per-layer drift, latency",
    "serve-repo": "write a Triton Inference Server model repository (in-flight batching Python model, implicit-state "
                  "decode config)",
    "serve": "run the tritonserver bundled in nvidia-pytriton on a model repository",
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="mambadeploy",
        description="Mamba + MoE language models (BlackMamba, MoE-Mamba, Jamba, Mamba) from checkpoints to ONNX Runtime "
                    "and TensorRT, each artifact checked against a PyTorch reference. Run `mambadeploy COMMAND --help` "
                    "for a command's options.")
    parser.add_argument("--version", action="version", version=f"mambadeploy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(f"mambadeploy.commands.{name.replace('-', '_')}")
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None:  # the real command line (tests call main([...]) in their own process: leave its signals alone)
        from .interrupts import install

        install()
    try:
        return int(args._run(args) or 0)
    except MambaDeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
