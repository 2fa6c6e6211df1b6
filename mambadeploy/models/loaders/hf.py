"""Hugging Face directories: `config.json` with `model_type` "mamba" (MambaForCausalLM) or "jamba" (JambaForCausalLM),
weights in `model.safetensors` or shards listed by `model.safetensors.index.json`, read with safetensors' `safe_open`
(memory-mapped; one parameter at a time, never a second full copy in RAM).

Config defaults are transformers' own (MambaConfig / JambaConfig, checked against transformers 5.23), so a config.json
that omits a key means what it means to transformers.

mamba:  vocab_size, hidden_size, num_hidden_layers, state_size (16), expand (2) or intermediate_size, conv_kernel (4),
        time_step_rank ("auto" = ceil(hidden_size / 16)), use_bias (false) -> in/out_proj bias, use_conv_bias (true),
        layer_norm_epsilon (1e-5), hidden_act (silu: the conv activation; nothing else is supported),
        tie_word_embeddings (true), residual_in_fp32 (true; we always keep the residual stream in fp32).
  keys: backbone.embeddings.weight (older files: backbone.embedding.weight), backbone.layers.{i}.norm.weight,
        backbone.layers.{i}.mixer.*, backbone.norm_f.weight, lm_head.weight (read only when not tied).
jamba:  layer i is attention when i % attn_layer_period == attn_layer_offset (8 / 4), else Mamba; its feed-forward is
        MoE when num_experts > 1 and i % expert_layer_period == expert_layer_offset (2 / 1), else a dense MLP
        (an explicit `layers_block_type` list in config.json wins over period/offset). num_experts (16),
        num_experts_per_tok (2), intermediate_size, num_attention_heads, num_key_value_heads (= heads when null),
        head_dim (hidden_size / heads), mamba_d_state (16), mamba_d_conv (4), mamba_expand (2), mamba_dt_rank ("auto"),
        mamba_conv_bias (true), mamba_proj_bias (false), rms_norm_eps (1e-6), hidden_act (silu),
        tie_word_embeddings (false), max_position_embeddings (262144) -> KV cache length (load_model's max_context
        overrides it: the cache is preallocated per sequence).
  keys: model.embed_tokens.weight, model.layers.{i}.input_layernorm.weight (-> mixer_norm),
        model.layers.{i}.pre_ff_layernorm.weight (-> ffn_norm), model.layers.{i}.mamba.* (dt_layernorm, b_layernorm,
        c_layernorm -> dt_norm, B_norm, C_norm), model.layers.{i}.self_attn.{q,k,v,o}_proj.weight,
        model.layers.{i}.feed_forward.{gate,up,down}_proj.weight (dense), model.layers.{i}.feed_forward.router.weight
        with experts either per expert `experts.{e}.{gate,up,down}_proj.weight` (hub checkpoints; what
        save_pretrained writes) or fused `experts.gate_up_proj` (E, 2F, d) [gate; up] and `experts.down_proj`
        (E, d, F) (transformers 5's in-memory layout), model.final_layernorm.weight, lm_head.weight.
"""

from __future__ import annotations

import json
import math
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ...errors import CheckpointError, ConfigError
from ..config import AttentionConfig, LayerSpec, MambaConfig, MLPConfig, ModelConfig, MoEConfig
from .common import Piece, load_pieces, read_json_config

if TYPE_CHECKING:
    from ..model import MambaMoELM


# --------------------------------------------------------------------------- configs
def _silu_mixer(data: dict, where: str) -> None:
    """hidden_act is the Mamba conv activation in both models (and Jamba's MLP/expert activation): silu only."""
    act = data.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"{where}: hidden_act {act!r} is not supported (it is also the Mamba conv activation; "
                          "only silu)")


def mamba_config(data: dict, where: str) -> ModelConfig:
    _silu_mixer(data, where)
    d = int(data["hidden_size"])
    rank = data.get("time_step_rank", "auto")
    d_inner = int(data.get("intermediate_size") or int(data.get("expand", 2) * d))
    return ModelConfig(
        family="mamba", vocab_size=int(data["vocab_size"]), d_model=d,
        layers=[LayerSpec("mamba", "none") for _ in range(int(data["num_hidden_layers"]))],
        mamba=MambaConfig(d_inner=d_inner, d_state=int(data.get("state_size", 16)),
                          d_conv=int(data.get("conv_kernel", 4)),
                          dt_rank=math.ceil(d / 16) if rank == "auto" else int(rank),
                          conv_bias=bool(data.get("use_conv_bias", True)), proj_bias=bool(data.get("use_bias", False))),
        norm_eps=float(data.get("layer_norm_epsilon", 1e-5)), final_norm="rmsnorm",
        tie_embeddings=bool(data.get("tie_word_embeddings", True)),
        extra={"source_format": "hf-mamba", "residual_in_fp32": bool(data.get("residual_in_fp32", True))},
    )


def jamba_layers(data: dict) -> list[LayerSpec]:
    n = int(data["num_hidden_layers"])
    kinds = data.get("layers_block_type") or [
        "attention" if i % data.get("attn_layer_period", 8) == data.get("attn_layer_offset", 4) else "mamba"
        for i in range(n)
    ]
    if len(kinds) != n or set(kinds) - {"attention", "mamba"}:
        raise ConfigError(f"layers_block_type must list 'attention'/'mamba' for all {n} layers, got {kinds}")
    moe = [data.get("num_experts", 16) > 1 and i % data.get("expert_layer_period", 2) == data.get("expert_layer_offset", 1)
           for i in range(n)]
    return [LayerSpec(kind, "moe" if is_moe else "mlp") for kind, is_moe in zip(kinds, moe)]


def jamba_config(data: dict, where: str) -> ModelConfig:
    _silu_mixer(data, where)
    d = int(data["hidden_size"])
    heads = int(data.get("num_attention_heads", 32))
    kv = data.get("num_key_value_heads") or heads
    rank = data.get("mamba_dt_rank", "auto")
    act = "silu"  # checked by _silu_mixer
    ffn = int(data.get("intermediate_size", 14336))
    layers = jamba_layers(data)
    n_experts = int(data.get("num_experts", 16))
    return ModelConfig(
        family="jamba", vocab_size=int(data.get("vocab_size", 65536)), d_model=d, layers=layers,
        mamba=MambaConfig(d_inner=int(data.get("mamba_expand", 2)) * d, d_state=int(data.get("mamba_d_state", 16)),
                          d_conv=int(data.get("mamba_d_conv", 4)),
                          dt_rank=math.ceil(d / 16) if rank == "auto" else int(rank),
                          conv_bias=bool(data.get("mamba_conv_bias", True)),
                          proj_bias=bool(data.get("mamba_proj_bias", False)), bcdt_norm=True),
        attention=AttentionConfig(n_heads=heads, n_kv_heads=int(kv), head_dim=int(data.get("head_dim") or d // heads)),
        moe=MoEConfig(n_experts=n_experts, ffn_size=ffn, top_k=int(data.get("num_experts_per_tok", 2)),
                      router="softmax_topk", router_bias=False, activation=act)
        if any(l.ffn == "moe" for l in layers) else None,
        mlp=MLPConfig(ffn_size=ffn, activation=act) if any(l.ffn == "mlp" for l in layers) else None,
        norm_eps=float(data.get("rms_norm_eps", 1e-6)), final_norm="rmsnorm",
        tie_embeddings=bool(data.get("tie_word_embeddings", False)),
        max_seq_len=int(data.get("max_position_embeddings", 262144)),
        extra={"source_format": "hf-jamba", "max_position_embeddings": data.get("max_position_embeddings", 262144)},
    )


def config_from_json(data: dict, where: str = "config.json") -> ModelConfig:
    build = {"mamba": mamba_config, "jamba": jamba_config}.get(data.get("model_type"))
    if build is None:
        raise CheckpointError(f"{where}: unknown model_type {data.get('model_type')!r} (supported: 'mamba', 'jamba')")
    try:
        return build(data, where)
    except KeyError as exc:
        raise ConfigError(f"{where}: missing config key {exc}") from exc


def read_config(directory: Path) -> ModelConfig:
    return read_json_config(directory, config_from_json)


# --------------------------------------------------------------------------- key plans
def _cat(tensors):
    return torch.cat(tensors, dim=0)


def _stack(tensors):
    return torch.stack(tensors)


def _stack_gate_up(tensors):
    """[gate_0..gate_{E-1}, up_0..up_{E-1}] -> (E, 2F, d) with [gate; up] per expert."""
    E = len(tensors) // 2
    return torch.stack([torch.cat([g, u], dim=0) for g, u in zip(tensors[:E], tensors[E:])])


def mamba_plan(model, available: dict) -> tuple[dict[str, Piece], list[str]]:
    """(our name -> Piece, checkpoint keys present but deliberately unused)."""
    pieces, ignored = {}, []
    embed = "backbone.embeddings.weight"
    if embed not in available and "backbone.embedding.weight" in available:
        embed = "backbone.embedding.weight"  # older files; transformers renames it on load too
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        if name == "embedding.weight":
            src = embed
        elif name == "final_norm.weight":
            src = "backbone.norm_f.weight"
        elif name == "lm_head.weight":
            src = "lm_head.weight"
        else:
            _, i, part, rest = name.split(".", 3)
            src = f"backbone.layers.{i}.norm.weight" if part == "mixer_norm" else f"backbone.layers.{i}.mixer.{rest}"
        pieces[name] = Piece([src], [shape])
    if model.lm_head is None:
        ignored.append("lm_head.weight")  # tied: transformers ignores a stored copy as well
    return pieces, ignored


_JAMBA_MIXER_NAMES = {"dt_norm": "dt_layernorm", "B_norm": "b_layernorm", "C_norm": "c_layernorm"}


def jamba_plan(model, available: dict) -> tuple[dict[str, Piece], list[str]]:
    config, pieces, ignored = model.config, {}, []
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        if name == "embedding.weight":
            pieces[name] = Piece(["model.embed_tokens.weight"], [shape])
        elif name == "final_norm.weight":
            pieces[name] = Piece(["model.final_layernorm.weight"], [shape])
        elif name == "lm_head.weight":
            pieces[name] = Piece(["lm_head.weight"], [shape])
        else:
            _, i, part, rest = name.split(".", 3)
            src = f"model.layers.{i}"
            if part == "mixer_norm":
                pieces[name] = Piece([f"{src}.input_layernorm.weight"], [shape])
            elif part == "ffn_norm":
                pieces[name] = Piece([f"{src}.pre_ff_layernorm.weight"], [shape])
            elif part == "mixer":
                head, _, tail = rest.partition(".")
                if config.layers[int(i)].mixer == "attention":
                    pieces[name] = Piece([f"{src}.self_attn.{rest}"], [shape])
                else:
                    pieces[name] = Piece([f"{src}.mamba.{_JAMBA_MIXER_NAMES.get(head, head)}.{tail}".rstrip(".")],
                                         [shape])
            elif rest == "router.weight":
                pieces[name] = Piece([f"{src}.feed_forward.router.weight"], [shape])
            elif config.layers[int(i)].ffn == "mlp":
                ff = f"{src}.feed_forward"
                if rest == "w1":
                    half = (shape[0] // 2, shape[1])
                    pieces[name] = Piece([f"{ff}.gate_proj.weight", f"{ff}.up_proj.weight"], [half, half], _cat)
                else:
                    pieces[name] = Piece([f"{ff}.down_proj.weight"], [shape])
            else:
                pieces[name] = _jamba_experts(f"{src}.feed_forward.experts", rest, shape, available)
    if model.lm_head is None:
        ignored.append("lm_head.weight")
    return pieces, ignored


def _jamba_experts(prefix: str, which: str, shape: tuple, available: dict) -> Piece:
    """Experts of one MoE layer, fused (transformers 5 in memory) or per expert (hub files), whichever is present."""
    fused = f"{prefix}.gate_up_proj" in available or f"{prefix}.down_proj" in available
    if which == "w1":
        if fused:
            return Piece([f"{prefix}.gate_up_proj"], [shape])
        E, F2, d = shape
        keys = [f"{prefix}.{e}.gate_proj.weight" for e in range(E)] + [f"{prefix}.{e}.up_proj.weight" for e in range(E)]
        return Piece(keys, [(F2 // 2, d)] * (2 * E), _stack_gate_up)
    if fused:
        return Piece([f"{prefix}.down_proj"], [shape])
    return Piece([f"{prefix}.{e}.down_proj.weight" for e in range(shape[0])], [shape[1:]] * shape[0], _stack)


# --------------------------------------------------------------------------- safetensors
def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from exc
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not (directory / f).exists()]
        if absent:
            raise CheckpointError(f"{index}: shard files missing: {', '.join(absent)}")
        return [directory / f for f in files]
    single = directory / "model.safetensors"
    if single.exists():
        return [single]
    others = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    hint = f" (found {', '.join(others)}: re-save with save_pretrained(safe_serialization=True))" if others else ""
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json{hint}")


def _open_all(stack: ExitStack, files: list[Path]) -> dict:
    """checkpoint key -> open safe_open handle."""
    from safetensors import SafetensorError, safe_open

    where = {}
    for f in files:
        try:
            handle = stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
            keys = list(handle.keys())
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{f}: truncated or corrupt safetensors file ({exc})") from exc
        for k in keys:
            if k in where:
                raise CheckpointError(f"{f}: key {k} also appears in another shard")
            where[k] = (handle, f)
    return where


def _reader(where: dict):
    from safetensors import SafetensorError

    def read(key):
        handle, f = where[key]
        try:
            return handle.get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{f}: cannot read {key}: truncated or corrupt safetensors file ({exc})") from exc

    return read


def load_hf(directory, dtype: torch.dtype, device) -> MambaMoELM:
    from ..model import empty_model

    directory = Path(directory)
    config = read_config(directory)
    model_type = config.extra["source_format"].removeprefix("hf-")
    files = _weight_files(directory)
    model = empty_model(config, dtype, device)
    with ExitStack() as stack:
        where = _open_all(stack, files)
        available = {k: tuple(h.get_slice(k).get_shape()) for k, (h, _) in where.items()}
        pieces, ignored = (mamba_plan if model_type == "mamba" else jamba_plan)(model, available)
        label = str(files[0]) if len(files) == 1 else f"{directory} ({len(files)} shards)"
        load_pieces(model, pieces, available, _reader(where), label, ignored=ignored)
    model.source = {"kind": "hf", "model_type": model_type, "path": str(directory)}
    return model
