"""The one model definition for BlackMamba, MoE-Mamba, Jamba (and plain Mamba): a stack of pre-norm blocks, each with an
optional mixer (Mamba-1 or attention) and an optional feed-forward (dense gated MLP or MoE), fp32 residual stream.

`forward` runs a (left-padded) batch of prompts and returns every position's logits and the state after the prompt;
`step` advances the state by one token. State is plain tensors (see state.py), so both map one-to-one onto graphs.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn as nn

from ..errors import InputError
from .config import ModelConfig
from . import sparsity
from .layers import Attention, GatedMLP, LayerNorm, MambaMixer, MoE, RMSNorm
from .state import state_specs


class Block(nn.Module):
    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        spec = config.layers[index]
        self.kind = spec
        self.mixer_norm = RMSNorm(config.d_model, config.norm_eps) if spec.mixer != "none" else None
        self.mixer = {"mamba": MambaMixer, "attention": Attention}.get(spec.mixer, lambda c: None)(config)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps) if spec.ffn != "none" else None
        self.ffn = {"mlp": GatedMLP, "moe": MoE}.get(spec.ffn, lambda c: None)(config)


class MambaMoELM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        norm_cls = LayerNorm if config.final_norm == "layernorm" else RMSNorm
        self.final_norm = norm_cls(config.d_model, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        sparsity.attach(self, config)  # SCAP sparsifiers named by config.sparsity (none for a dense model)

    # ------------------------------------------------------------------ helpers
    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    def _head(self, h):
        x = self.final_norm(h.to(self.dtype))
        w = self.embedding.weight if self.lm_head is None else self.lm_head.weight
        return torch.nn.functional.linear(x, w).float()

    def check_ids(self, ids: torch.Tensor) -> None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.config.vocab_size)].unique().tolist()[:5]
            raise InputError(f"token id(s) {bad} outside the vocabulary [0, {self.config.vocab_size})")

    # ------------------------------------------------------------------ sequence
    def forward(self, input_ids, lengths=None, check: bool = True, state=None):
        """input_ids: (B, L) int64, left-padded when `lengths` (B,) gives each row's real length.
        Returns (logits (B, L, V) fp32, state after the prompt). Logits at pad positions are meaningless.
        state: continue these sequences (a state from forward / prefill / step; not modified) instead of starting
        fresh: a long prompt given in chunks gives the state and last logits of the whole prompt at once (a row may
        then have 0 real tokens in a chunk). The chunks must be those of one left-padded prompt: a row's pads come
        before all of its real tokens (a pad between real tokens would enter the Mamba conv window as a zero)."""
        B, L = input_ids.shape
        valid = None
        if lengths is not None:
            lengths = lengths.to(input_ids.device)
            valid = torch.arange(L, device=input_ids.device)[None, :] >= (L - lengths)[:, None]
        if check:
            self._check_prompt(input_ids, lengths, state)
        dtype = self.dtype
        h = self.embedding(input_ids).float()
        incoming, state = state, OrderedDict()
        pos = None
        pending = None  # the last sub-layer's output, added to h by the next norm (one add + RMSNorm op, as in step)
        for i, block in enumerate(self.layers):
            past = () if incoming is None else tuple(incoming[f"L{i}.{n}"] for n in _STATE_OF[block.kind.mixer])
            if block.kind.mixer == "mamba":
                x, h = _add_norm(pending, h, block.mixer_norm, dtype)
                pending, conv, ssm = block.mixer(x, valid, *past)
                state[f"L{i}.conv"], state[f"L{i}.ssm"] = conv, ssm
            elif block.kind.mixer == "attention":
                past = past + ((incoming["pos"],) if incoming is not None else ())
                x, h = _add_norm(pending, h, block.mixer_norm, dtype)
                pending, k, v, pos = block.mixer(x, valid, *past)
                state[f"L{i}.key"], state[f"L{i}.value"] = k, v
            if block.ffn is not None:
                x, h = _add_norm(pending, h, block.ffn_norm, dtype)
                pending = block.ffn(x)
        if pending is not None:
            h = h + pending.float()
        if pos is not None:
            state["pos"] = pos.to(torch.int64)
        return self._head(h), state

    def _check_prompt(self, input_ids, lengths, state=None):
        B, L = input_ids.shape
        if L == 0 or B == 0:
            raise InputError("empty prompt: give at least one token")
        least = 0 if state is not None else 1  # a continued row may have nothing new in a chunk
        if lengths is not None and (int(lengths.min()) < least or int(lengths.max()) > L):
            raise InputError(f"prompt lengths must be in [{least}, {L}], got {lengths.tolist()}")
        if lengths is None:
            self.check_ids(input_ids)
        else:  # only the real tokens: pads may be any id (arange on the ids' device, lengths already moved there)
            self.check_ids(input_ids[torch.arange(L, device=input_ids.device)[None, :] >= (L - lengths)[:, None]])
        held = int(state["pos"].max()) if state is not None and "pos" in state else 0
        if self.config.has_attention and held + L > self.config.max_seq_len:
            raise InputError(f"prompt of {L} tokens{f' after {held} held' if held else ''} is longer than the "
                             f"attention KV cache ({self.config.max_seq_len} slots)")

    def prefill(self, input_ids, lengths=None, state=None):
        """Returns (last-position logits (B, V) fp32, state); `state`: continue it (see forward)."""
        logits, state = self.forward(input_ids, lengths, state=state)
        return logits[:, -1], state

    # ------------------------------------------------------------------ step
    def step(self, token_ids, state, check: bool = True):
        """token_ids: (B,) or (B, 1) int64. Returns (logits (B, V) fp32, new state). `state` is not modified."""
        token_ids = token_ids.reshape(-1)
        if check:
            self.check_ids(token_ids)
            if "pos" in state and int(state["pos"].max()) >= self.config.max_seq_len:
                raise InputError(f"sequence reached the attention KV cache length ({self.config.max_seq_len})")
        dtype = self.dtype
        h = self.embedding(token_ids).float()
        new = OrderedDict()
        pending = None  # the last sub-layer's output, added to h by the next norm (one fused add + RMSNorm op)
        for i, block in enumerate(self.layers):
            if block.kind.mixer == "mamba":
                x, h = _add_norm(pending, h, block.mixer_norm, dtype)
                pending, conv, ssm = block.mixer.step(x, state[f"L{i}.conv"], state[f"L{i}.ssm"])
                new[f"L{i}.conv"], new[f"L{i}.ssm"] = conv, ssm
            elif block.kind.mixer == "attention":
                x, h = _add_norm(pending, h, block.mixer_norm, dtype)
                pending, k, v = block.mixer.step(x, state[f"L{i}.key"], state[f"L{i}.value"], state["pos"])
                new[f"L{i}.key"], new[f"L{i}.value"] = k, v
            if block.ffn is not None:
                x, h = _add_norm(pending, h, block.ffn_norm, dtype)
                pending = block.ffn(x)
        if pending is not None:
            h = h + pending.float()
        if "pos" in state:
            new["pos"] = state["pos"] + 1
        return self._head(h), new

    def state_specs(self):
        return state_specs(self.config, self.dtype)

    # ------------------------------------------------------------------ counting
    def parameter_counts(self) -> tuple[int, int]:
        """(total, active per token): MoE layers count top_k of n_experts experts as active."""
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        for block in self.layers:
            if isinstance(block.ffn, MoE):
                per_expert = block.ffn.w1[0].numel() + block.ffn.w2[0].numel()
                inactive += per_expert * (block.ffn.w1.shape[0] - block.ffn.top_k)
        return total, total - inactive


_STATE_OF = {"mamba": ("conv", "ssm"), "attention": ("key", "value"), "none": ()}


def empty_model(config, dtype=torch.float32, device="cpu") -> MambaMoELM:
    """A model with uninitialised parameters allocated once, directly in `dtype` on `device` (no fp32 copy first)."""
    with torch.device("meta"):
        model = MambaMoELM(config)
    return model._apply(lambda t: torch.empty_like(t, device=device, dtype=dtype if t.is_floating_point() else t.dtype))


def _add_norm(pending, h, norm, dtype):
    """h += pending (fp32), then the block norm in the model dtype: the same numbers as `h = h + out.float()` followed
    by `norm(h).to(dtype)`, written as one ref_ops.add_rms_norm_ref call so the decode export makes it one node."""
    if pending is None:
        return norm(h).to(dtype), h
    return norm(h, pending)


@torch.no_grad()
def init_random_(model: MambaMoELM, seed: int = 0) -> MambaMoELM:
    """Seeded random weights with the usual Mamba initialisation, scaled so activations keep unit-ish size
    (logits spread out, so greedy decoding is not a sequence of near-ties)."""
    # Always drawn on the CPU, one parameter at a time, then copied to the parameters' device: a preset is the same model
    # on every device (an export traced on the CPU and a GPU run must agree), at ~10 s of CPU time for the 2.8B shape.
    g = torch.Generator(device="cpu").manual_seed(seed)
    from tqdm import tqdm

    big = sum(p.numel() for p in model.parameters()) > (1 << 27)  # a bar for the full-size presets (~10 s)
    for name, p in tqdm(list(model.named_parameters()), desc="random weights", unit="tensor", leave=False,
                        disable=None if big else True):
        p.copy_(random_value(name, tuple(p.shape), g))
    return model


def random_value(name: str, shape: tuple, g: torch.Generator, fan_in: int | None = None) -> torch.Tensor:
    """The fp32 initial value of parameter `name` of `shape`, drawn from `g` (on g's device). fan_in: the full input
    width when `shape` is one rank's slice (parallel/: its weights keep the single-process scale)."""
    device = g.device
    leaf = name.rsplit(".", 1)[-1]

    def randn():
        return torch.randn(shape, generator=g, device=device)

    if name.endswith("norm.weight") or name.endswith("final_norm.weight"):
        return 1.0 + 0.1 * randn()
    if name.endswith("final_norm.bias"):
        return randn() * 0.1
    if leaf == "A_log":
        return torch.log(torch.arange(1, shape[1] + 1, dtype=torch.float32, device=device)).expand(shape)
    if leaf == "D":
        return torch.ones(shape, device=device)
    if name.endswith("dt_proj.bias"):
        dt = torch.exp(torch.rand(shape, generator=g, device=device) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        return dt + torch.log(-torch.expm1(-dt))  # inverse softplus
    if name.endswith("embedding.weight"):
        # small next to the blocks' outputs: with a tied head, a large embedding makes the model echo its input
        return randn() * 0.1
    if leaf == "bias":
        return randn() * 0.02
    return randn() * (1.0 / math.sqrt(fan_in or shape[-1]))
