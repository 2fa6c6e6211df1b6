"""BlackMamba's released layout (github.com/Zyphra/BlackMamba): `config.json` + `pytorch_model.bin` = {"model": state_dict}.

Key names (layer i counts every block, Mamba and MoE alike):
  embedding.word_embeddings.weight                      -> embedding.weight (the LM head is tied to it)
  decoder.layers.{i}.norm.weight                        -> layers.{i}.mixer_norm.weight (Mamba) / ffn_norm.weight (MoE, MLP)
  decoder.layers.{i}.mixer.{in_proj.weight, conv1d.weight, conv1d.bias, x_proj.weight, dt_proj.weight, dt_proj.bias,
                            A_log, D, out_proj.weight}   -> layers.{i}.mixer.<same>
  decoder.layers.{i}.mixer.router.{weight,bias}         -> layers.{i}.ffn.router.<same>
  decoder.layers.{i}.mixer.local_experts.{e}.linear_fc1.weight (2F, d) -> stacked into layers.{i}.ffn.w1 (E, 2F, d)
  decoder.layers.{i}.mixer.local_experts.{e}.linear_fc2.weight (d, F) -> stacked into layers.{i}.ffn.w2 (E, d, F)
  decoder.layers.{i}.mixer.linear_fc{1,2}.weight        -> layers.{i}.ffn.w{1,2} (a dense "1" layer)
  decoder.final_layernorm.{weight,bias}                 -> final_norm.<same>

config.json -> ModelConfig (what the released `MambaModel.from_pretrained` reads, plus optional keys):
  num_layers, hidden_size, vocab_size, state_size, conv_dimension (required); expansion_factor (2);
  ffn_hidden_size (4 * hidden_size); mamba_moe_layers: one entry per layer, "r" = Mamba mixer, "N" = MoE of N experts
  ("1" = a dense gated MLP), "rN" (parallel Mamba + MoE) is not supported; swiglu / gated_linear_unit (true: fc1 is
  2 * ffn wide and gated; false is not supported); add_bias_linear (false; true is not supported: our experts have no
  bias); conv_bias (true); dt_rank ("auto" = ceil(hidden_size / 16)); layernorm_epsilon (1e-5); routing_mode
  ("sinkhorn" = sigmoid router, argmax, scaled by the sigmoid, as the released inference computes; anything else =
  softmax top-1); max_sequence_length (2048).
  activation: our own optional key, "gelu" (default: exact erf GELU, what the released code computes although the
  config says swiglu), "silu" (SwiGLU as the paper describes) or "gelu_tanh".
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ...errors import CheckpointError, ConfigError
from ..config import ACTIVATIONS, LayerSpec, MambaConfig, MLPConfig, ModelConfig, MoEConfig
from .common import Piece, load_pieces, read_json_config

if TYPE_CHECKING:
    from ..model import MambaMoELM

WEIGHTS_NAME = "pytorch_model.bin"
REQUIRED_KEYS = ("num_layers", "hidden_size", "vocab_size", "state_size", "conv_dimension")


# --------------------------------------------------------------------------- config
def _parse_layers(entries, n_layers: int) -> tuple[list[LayerSpec], set[int]]:
    """mamba_moe_layers -> (layer specs, set of expert counts of the MoE layers)."""
    if not entries:
        return [LayerSpec("mamba", "none") for _ in range(n_layers)], set()
    if isinstance(entries, str):
        entries = entries.replace(",", " ").split()
    if len(entries) != n_layers:
        raise ConfigError(f"mamba_moe_layers has {len(entries)} entries but num_layers is {n_layers}")
    specs, experts, bad = [], set(), []
    for i, entry in enumerate(str(e).strip() for e in entries):
        if entry == "r":
            specs.append(LayerSpec("mamba", "none"))
        elif entry.isdigit() and int(entry) >= 1:
            n = int(entry)
            specs.append(LayerSpec("none", "mlp" if n == 1 else "moe"))
            if n > 1:
                experts.add(n)
        elif entry.startswith("r") and entry[1:].isdigit():
            bad.append(f"layer {i}: {entry!r} (a parallel Mamba + MoE block) is not supported")
        else:
            bad.append(f"layer {i}: unknown entry {entry!r} (expected 'r' or an expert count)")
    if bad:
        raise ConfigError("mamba_moe_layers: " + "; ".join(bad))
    return specs, experts


def config_from_json(data: dict, where: str = "config.json") -> ModelConfig:
    """Map a released BlackMamba config.json onto ModelConfig (see the module docstring for every key)."""
    absent = [k for k in REQUIRED_KEYS if k not in data]
    if absent:
        raise ConfigError(f"{where}: missing BlackMamba config keys {absent}")
    problems = []
    gated = data.get("swiglu", data.get("gated_linear_unit", True))
    if not gated:
        problems.append("swiglu/gated_linear_unit false (un-gated experts) is not supported")
    if data.get("add_bias_linear", False):
        problems.append("add_bias_linear true (biases in expert and projection linears) is not supported")
    if not data.get("rms_norm", True):
        problems.append("rms_norm false is not supported (the released code only builds RMSNorm blocks)")
    activation = data.get("activation", "gelu")
    if activation not in ACTIVATIONS:
        problems.append(f"activation {activation!r} not in {ACTIVATIONS}")
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))
    d, n_layers = int(data["hidden_size"]), int(data["num_layers"])
    specs, expert_counts = _parse_layers(data.get("mamba_moe_layers"), n_layers)
    if len(expert_counts) > 1:
        raise ConfigError(f"{where}: MoE layers with different expert counts {sorted(expert_counts)} are not supported")
    ffn = int(data.get("ffn_hidden_size") or 4 * d)
    dt_rank = data.get("dt_rank", "auto")
    routing = data.get("routing_mode", "sinkhorn")
    moe = None
    if expert_counts:
        moe = MoEConfig(
            n_experts=expert_counts.pop(), ffn_size=ffn, top_k=1, router_bias=True, activation=activation,
            router="sigmoid_top1" if routing == "sinkhorn" else "softmax_topk",
        )
    return ModelConfig(
        family="blackmamba", vocab_size=int(data["vocab_size"]), d_model=d, layers=specs,
        mamba=MambaConfig(
            d_inner=int(data.get("expansion_factor", 2) * d), d_state=int(data["state_size"]),
            d_conv=int(data["conv_dimension"]), dt_rank=math.ceil(d / 16) if dt_rank == "auto" else int(dt_rank),
            conv_bias=bool(data.get("conv_bias", True)), proj_bias=False,
        ),
        moe=moe,
        mlp=MLPConfig(ffn_size=ffn, activation=activation) if any(s.ffn == "mlp" for s in specs) else None,
        norm_eps=float(data.get("layernorm_epsilon", 1e-5)), final_norm="layernorm", tie_embeddings=True,
        max_seq_len=int(data.get("max_sequence_length", 2048)),
        extra={"source_format": "blackmamba", "routing_mode": routing,
               "residual_in_fp32": bool(data.get("residual_in_fp32", True))},
    )


def config_to_json(config: ModelConfig) -> dict:
    """The inverse of config_from_json, in the released key names. Refuses configs the layout cannot express."""
    m, problems = config.mamba, []
    if config.has_attention or any(s.mixer == "mamba" and s.ffn != "none" for s in config.layers):
        problems.append("every layer must be Mamba-only or feed-forward-only")
    if m is None or m.d_inner % config.d_model or m.proj_bias or m.bcdt_norm:
        problems.append("Mamba mixer must have d_inner = k * d_model, no projection bias, no dt/B/C norms")
    if config.final_norm != "layernorm" or not config.tie_embeddings:
        problems.append("needs a LayerNorm final norm and a tied LM head")
    if config.moe is not None and (not config.moe.router_bias or config.moe.top_k != 1):
        problems.append("MoE must be top-1 with a router bias")
    ffns = {c.ffn_size for c in (config.moe, config.mlp) if c is not None}
    acts = {c.activation for c in (config.moe, config.mlp) if c is not None}
    if len(ffns) > 1 or len(acts) > 1:
        problems.append("MoE and MLP layers must share ffn size and activation")
    if problems:
        raise ConfigError("cannot write this model in the BlackMamba layout: " + "; ".join(problems))
    entries = ["r" if s.mixer == "mamba" else ("1" if s.ffn == "mlp" else str(config.moe.n_experts))
               for s in config.layers]
    data = {
        "num_layers": config.n_layers, "hidden_size": config.d_model, "state_size": m.d_state,
        "conv_dimension": m.d_conv, "vocab_size": config.vocab_size, "expansion_factor": m.d_inner // config.d_model,
        "mamba_moe_layers": entries, "ffn_hidden_size": ffns.pop() if ffns else 4 * config.d_model,
        "bias": False, "add_bias_linear": False, "swiglu": True, "conv_bias": m.conv_bias,
        "layernorm_epsilon": config.norm_eps, "max_sequence_length": config.max_seq_len,
    }
    if m.dt_rank != math.ceil(config.d_model / 16):  # the released code always uses "auto"
        data["dt_rank"] = m.dt_rank
    if config.moe is not None:
        data["routing_mode"] = "sinkhorn" if config.moe.router == "sigmoid_top1" else "top1"
    act = acts.pop() if acts else "gelu"
    if act != "gelu":  # the released config has no such key: write it only when it is not the released default
        data["activation"] = act
    return data


def read_config(directory: Path) -> ModelConfig:
    return read_json_config(directory, config_from_json)


# --------------------------------------------------------------------------- key plan
def _stack(tensors):
    return torch.stack(tensors)


def plan(model) -> dict[str, Piece]:
    """Our parameter name -> the released keys it is built from (with their expected shapes)."""
    config, pieces = model.config, {}
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        if name == "embedding.weight":
            pieces[name] = Piece(["embedding.word_embeddings.weight"], [shape])
        elif name.startswith("final_norm."):
            pieces[name] = Piece([f"decoder.final_layernorm.{name.split('.')[-1]}"], [shape])
        else:
            _, i, part, rest = name.split(".", 3)  # layers.{i}.<part>.<rest>
            src = f"decoder.layers.{i}"
            if part in ("mixer_norm", "ffn_norm"):
                pieces[name] = Piece([f"{src}.norm.weight"], [shape])
            elif part == "mixer" or rest.startswith("router."):
                pieces[name] = Piece([f"{src}.mixer.{rest}"], [shape])
            elif config.layers[int(i)].ffn == "mlp":
                pieces[name] = Piece([f"{src}.mixer.linear_fc{rest[1]}.weight"], [shape])
            else:  # stacked experts: w1 <- linear_fc1, w2 <- linear_fc2
                keys = [f"{src}.mixer.local_experts.{e}.linear_fc{rest[1]}.weight" for e in range(shape[0])]
                pieces[name] = Piece(keys, [shape[1:]] * shape[0], _stack)
    return pieces


# --------------------------------------------------------------------------- load / save
def _torch_load_reason(exc: Exception) -> str:
    """torch.load's messages run to paragraphs: keep the line that says what went wrong."""
    text = str(exc)
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    line = found.group(1) if found else text.strip().split("\n")[0]
    return line.split(". ")[0][:200]


def _load_state_dict(path: Path) -> dict:
    """torch.load with weights_only (no arbitrary unpickling), memory-mapped when the file is in the zip format."""
    if not path.exists():
        raise CheckpointError(f"{path.parent}: {path.name} is missing")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format: no mmap
    except pickle.UnpicklingError as exc:
        reason = _torch_load_reason(exc)
        if "Unsupported global" in reason:
            raise CheckpointError(f"{path}: holds objects other than tensors, refused by torch.load(weights_only=True) "
                                  f"({reason}); re-save it as {{'model': state_dict}}") from exc
        raise CheckpointError(f"{path}: truncated or corrupt weight file ({reason})") from exc
    # random bytes reach the legacy unpickler's stack machine, which then fails in many ways (an empty-stack pop is an
    # IndexError, a missing memo a KeyError, a short read a struct.error): all of them mean a corrupt file
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, IndexError, KeyError, TypeError,
            struct.error) as exc:
        reason = "empty file" if path.stat().st_size == 0 else _torch_load_reason(exc)
        raise CheckpointError(f"{path}: truncated or corrupt weight file ({reason})") from exc
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise CheckpointError(f"{path}: expected {{'model': state_dict}}, got {type(obj).__name__}"
                              + (f" with keys {sorted(obj)[:5]}" if isinstance(obj, dict) else ""))
    sd = obj["model"]
    not_tensors = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path}: entries that are not tensors: {not_tensors[:5]}")
    return sd


def load_blackmamba(directory, dtype: torch.dtype, device) -> MambaMoELM:
    from ..model import empty_model

    directory = Path(directory)
    config = read_config(directory)
    sd = _load_state_dict(directory / WEIGHTS_NAME)
    model = empty_model(config, dtype, device)
    load_pieces(model, plan(model), {k: tuple(v.shape) for k, v in sd.items()}, sd.__getitem__,
                str(directory / WEIGHTS_NAME))
    model.source = {"kind": "blackmamba", "path": str(directory)}
    return model


def save_blackmamba(model, directory) -> Path:
    """Write `model` exactly in the released layout (config.json + pytorch_model.bin = {"model": state_dict})."""
    directory = Path(directory)
    data = config_to_json(model.config)
    params = dict(model.named_parameters())
    sd = {}
    for name, piece in plan(model).items():
        t = params[name].detach().cpu()
        parts = [t] if len(piece.sources) == 1 else list(t.unbind(0))
        for key, part in zip(piece.sources, parts):
            sd[key] = part.clone().contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".tmp", delete=False) as f:
        tmp = f.name
    torch.save({"model": sd}, tmp)
    os.replace(tmp, directory / WEIGHTS_NAME)
    (directory / "config.json").write_text(json.dumps(data, indent=2))
    return directory
