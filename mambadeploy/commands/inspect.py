"""`mambadeploy inspect MODEL`: what a model is — family, layer pattern, parameters (total and active per token), decode
state per sequence — read from its config alone (no weights are loaded, so full-size models inspect instantly).

MODEL is a preset name or a checkpoint directory; an export directory (with manifest.json) is described from its
manifest by `describe_export`, the place to extend for export/engine artifacts.
"""

from __future__ import annotations

import json
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("model", help="preset name, checkpoint directory, or export directory (manifest.json)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"),
                        help="weight dtype for the byte counts (state: SSM/conv fp32, KV cache in this dtype)")
    parser.add_argument("--max-context", type=int, metavar="N",
                        help="count the KV cache at N tokens per sequence (default: the checkpoint's context)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--skip-weights", action="store_true",
                        help="do not read a checkpoint's weights (by default they are loaded once, on the CPU in "
                             "--dtype, to check they are complete and finite)")


# --------------------------------------------------------------------------- model configs
def read_model_config(target: str):
    """(ModelConfig, source description) for a preset or any checkpoint directory, without reading weights."""
    from ..errors import CheckpointError
    from ..models.checkpoint import detect_format
    from ..models.config import ModelConfig
    from ..models.presets import PRESETS, preset_config
    from ..models.trained import resolve

    if target in PRESETS:
        return preset_config(target), {"kind": "preset", "name": target}
    path = Path(resolve(target))
    fmt = detect_format(path)
    if fmt == "native":
        try:
            meta = json.loads((path / "mambadeploy.json").read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path / 'mambadeploy.json'}: not valid JSON ({exc})") from exc
        config = ModelConfig.from_dict(meta["config"], f"{path / 'mambadeploy.json'}: config")
    elif fmt == "blackmamba":
        from ..models.loaders.blackmamba import read_config

        config = read_config(path)
    else:
        from ..models.loaders.hf import read_config

        config = read_config(path)
    return config, {"kind": fmt, "path": str(path)}


def describe_model(target: str, dtype, max_context: int | None = None) -> dict:
    import torch

    from ..errors import ConfigError
    from ..models.model import empty_model
    from ..models.state import state_bytes_by_kind, state_bytes_per_sequence

    config, source = read_model_config(target)
    if max_context is not None:
        if max_context < 1:
            raise ConfigError(f"--max-context must be a positive number of tokens, got {max_context}")
        config.max_seq_len = max_context
    model = empty_model(config, dtype, device="meta")  # shapes only: counting costs no memory
    total, active = model.parameter_counts()
    elem = torch.empty((), dtype=dtype).element_size()
    info = {
        "name": config.name or Path(target).name, "source": source, "family": config.family,
        "n_layers": config.n_layers, "layer_pattern": config.layer_pattern(), "d_model": config.d_model,
        "vocab_size": config.vocab_size, "dtype": str(dtype).replace("torch.", ""),
        "params_total": total, "params_active": active, "weight_bytes": total * elem,
        "state_bytes_per_sequence": state_bytes_per_sequence(config, dtype),
        "final_norm": config.final_norm, "tie_embeddings": config.tie_embeddings,
    }
    for part in ("mamba", "attention", "moe", "mlp"):
        sub = getattr(config, part)
        if sub is not None:
            info[part] = dict(vars(sub))
    if config.has_attention:
        info["kv_cache_len"] = config.max_seq_len
        kinds = state_bytes_by_kind(config, dtype)
        info["recurrent_state_bytes_per_sequence"] = kinds["recurrent"]
        info["kv_bytes_per_sequence"] = kinds["kv"]
        info["kv_bytes_per_sequence_fp8"] = state_bytes_by_kind(config, dtype, torch.float8_e4m3fn)["kv"]
    if config.sparsity.get("sites"):
        info["sparsity"] = config.sparsity  # SCAP: per site mode, threshold, target
    return info


# --------------------------------------------------------------------------- export directories
def describe_export(path: Path) -> dict:
    """An export/engine directory, from its manifest.json. Export directories (`mambadeploy export`) are read through
    export.manifest (checked: every graph and data file present with its recorded size); other manifests are shown raw."""
    from ..errors import CheckpointError

    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path / 'manifest.json'}: not valid JSON ({exc})") from exc
    files = sorted(p.name for p in path.iterdir() if p.is_file())
    from ..export.manifest import FORMAT, ManifestError

    raw = {"kind": "export", "path": str(path), "files": files, "manifest": manifest}
    from ..trt.engine_dir import FORMAT as ENGINE_FORMAT

    if isinstance(manifest, dict) and manifest.get("format") == ENGINE_FORMAT:
        return _describe_engines(path, files, manifest)
    if isinstance(manifest, dict) and manifest.get("format") == FORMAT:
        try:
            return _describe_onnx_export(path, files)
        except ManifestError as exc:  # inspect is for looking: show what is there and what is wrong with it
            raw["problem"] = str(exc)
    return raw


def _describe_engines(path: Path, files: list[str], manifest: dict) -> dict:
    """A TensorRT engine directory (mambadeploy build): what it was built from, for which GPU and TensorRT, its engines."""
    export = manifest.get("export_manifest") or {}
    return {"kind": "engines", "path": str(path), "files": files, "target": manifest.get("target"),
            "trt": manifest.get("trt"), "gpu": manifest.get("gpu"), "limits": manifest.get("limits"),
            "export_dir": manifest.get("export_dir"), "family": export.get("family"), "dtype": export.get("dtype"),
            "ops": export.get("ops"),
            "engines": {g: {k: e.get(k) for k in ("bytes", "fingerprint", "custom_ops")}
                        for g, e in (manifest.get("engines") or {}).items()},
            "run_with": f"mambadeploy generate {path} --backend trt --device cuda --prompt-ids 1,2,3",
            "build_command": manifest.get("build_command")}


def _describe_onnx_export(path: Path, files: list[str]) -> dict:
    from dataclasses import asdict

    from ..export.manifest import Manifest
    from ..models.state import state_bytes_per_sequence

    m = Manifest.read(path)
    m.check_files(path, hash_graphs=False)
    config = m.model_config
    from ..dtypes import parse_dtype

    dtype = parse_dtype(m.dtype)
    graphs = {name: {"file": g.file, "bytes": g.bytes, "external_data": g.external_data,
                     "inputs": [asdict(t) for t in g.inputs], "outputs": [asdict(t) for t in g.outputs]}
              for name, g in m.graphs.items()}
    return {"kind": "onnx-export", "path": str(path), "name": config.name, "family": m.family,
            "layer_pattern": config.layer_pattern(), "dtype": m.dtype, "ops": m.ops, "opset": m.opset,
            "domains": m.domains, "contrib": m.contrib, "limits": m.limits, "checkpoint": m.checkpoint,
            "exporter": m.exporter, "mambadeploy_version": m.mambadeploy_version,
            "state": [asdict(t) for t in m.state], "state_bytes_per_sequence": state_bytes_per_sequence(config, dtype),
            "graphs": graphs, "files": {f: (path / f).stat().st_size for f in files}}


def _export_rows(info: dict) -> list[tuple[str, str]]:
    lim = info["limits"]
    src = info["checkpoint"].get("source") or {}
    rows = [("kind", "ONNX export directory"), ("path", info["path"]), ("model", f"{info['name']} ({info['family']})"),
            ("layer pattern", info["layer_pattern"]),
            ("dtype / ops / opset", f"{info['dtype']} / {info['ops']} / {info['opset']}"),
            ("custom domains", ", ".join(f"{d} v{v}" for d, v in info["domains"].items()) or "none (standard ops)"),
            ("limits", f"batch <= {lim['max_batch']}, tokens per sequence <= {lim['max_length'] or 'unbounded'}"),
            ("checkpoint", ", ".join(f"{k}={v}" for k, v in src.items()) or "unknown"),
            ("config sha256", info["checkpoint"].get("config_sha256", "")[:16]),
            ("exported with", ", ".join(f"{k} {v}" for k, v in info["exporter"].items() if v)
             + f", mambadeploy {info['mambadeploy_version']}")]
    for op, what in info["contrib"].items():
        rows.append((f"contrib {op}", what))
    for name, g in info["graphs"].items():
        data = sum(e["bytes"] for e in g["external_data"])
        ext = f" + {_bytes(data)} external ({', '.join(e['file'] for e in g['external_data'])})" if data else ""
        ins = ", ".join(f"{t['name']}{t['shape']}" for t in g["inputs"][:2])
        more = ", ..." if len(g["inputs"]) > 2 else ""
        text = f"{g['file']} {_bytes(g['bytes'])}{ext}; {len(g['inputs'])} inputs ({ins}{more}), "
        rows.append((f"{name} graph", text + f"{len(g['outputs'])} outputs"))
    state = info["state"]
    rows.append(("state", f"{len(state)} tensors, {_bytes(info['state_bytes_per_sequence'])} per sequence: "
                 + ", ".join(f"{t['name']}{t['shape']} {t['dtype']}" for t in state[:4]) + (" ..." if len(state) > 4
                                                                                           else "")))
    rows.append(("files", ", ".join(f"{f} ({_bytes(n)})" for f, n in info["files"].items())))
    return rows


# --------------------------------------------------------------------------- output
def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit} ({n:,})"
    return f"{n:,}"


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit} ({n:,} B)"
    return f"{n:,} B"


def _rows(info: dict) -> list[tuple[str, str]]:
    if info.get("kind") == "onnx-export":
        return _export_rows(info)
    if info.get("kind") == "engines":
        rows = [("kind", "TensorRT engine directory"), ("path", info["path"])]
        for key in ("family", "dtype", "ops", "target", "trt", "gpu", "limits", "export_dir", "engines", "run_with",
                    "build_command"):
            value = info.get(key)
            rows.append((key.replace("_", " "), json.dumps(value) if isinstance(value, (dict, list)) else str(value)))
        return rows
    if info.get("kind") == "export":
        rows = [("kind", "export directory"), ("path", info["path"]), ("files", ", ".join(info["files"]))]
        rows += [("problem", info["problem"])] if "problem" in info else []
        return rows + [(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v)) for k, v in info["manifest"].items()]
    src = info["source"]
    rows = [
        ("name", info["name"]), ("source", f"{src['kind']}: {src.get('name') or src.get('path')}"),
        ("family", info["family"]), ("layers", str(info["n_layers"])), ("layer pattern", info["layer_pattern"]),
        ("d_model / vocab", f"{info['d_model']} / {info['vocab_size']}"),
        ("parameters (total)", _count(info["params_total"])),
        ("parameters (active per token)", _count(info["params_active"])),
        (f"weights ({info['dtype']})", _bytes(info["weight_bytes"])),
        ("decode state per sequence", _bytes(info["state_bytes_per_sequence"])),
    ]
    for part in ("mamba", "attention", "moe", "mlp"):
        if part in info:
            rows.append((part, ", ".join(f"{k}={v}" for k, v in info[part].items())))
    if "kv_cache_len" in info:
        rows.append(("KV cache length (tokens)", str(info["kv_cache_len"])))
        per_seq = (f"{_bytes(info['recurrent_state_bytes_per_sequence'])} / {_bytes(info['kv_bytes_per_sequence'])}"
                   f" (fp8 KV: {_bytes(info['kv_bytes_per_sequence_fp8'])})")
        rows.append(("  Mamba state / KV per sequence", per_seq))
    rows.append(("final norm / tied head", f"{info['final_norm']} / {info['tie_embeddings']}"))
    if "sparsity" in info:
        sp = info["sparsity"]
        rows.append(("SCAP sparsity", f"target {sp['target']}, mode {sp.get('mode', '?')}, {len(sp['sites'])} sites"))
        for site, s in sp["sites"].items():
            rows.append((f"  {site}", f"mode {s['mode_kind']} = {s['mode']:.4g}, threshold {s['threshold']:.4g}, "
                                       f"target {s['target']}"))
    if "weights" in info:
        rows.append(("weights", info["weights"]))
    return rows


def run(args) -> int:
    from ..models.checkpoint import parse_dtype
    from ..models.presets import PRESETS
    from ..models.trained import resolve

    path = Path(resolve(args.model))
    if args.model not in PRESETS and (path / "manifest.json").exists():
        info = describe_export(path)
    else:
        info = describe_model(args.model, parse_dtype(args.dtype), args.max_context)
        if args.model not in PRESETS and not args.skip_weights:
            from ..models.checkpoint import load_model

            load_model(path, dtype=args.dtype)  # raises CheckpointError naming a truncated file or non-finite tensor
            info["weights"] = "read and checked: complete, every value finite"
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"mambadeploy inspect {args.model}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in _rows(info):
        table.add_row(key, value)
    Console().print(table)
    return 0
