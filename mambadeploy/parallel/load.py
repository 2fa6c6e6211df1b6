"""This rank's model from a preset or a checkpoint directory, reading only its slices.

- Checkpoint directories (Hugging Face safetensors, our format, BlackMamba's pytorch_model.bin): the format's own key
  plan (models/loaders) names the source tensors of each parameter and how they combine (stacked experts, [gate; up]);
  the combine is replayed on row numbers to find which source rows this rank needs, and only those rows (and only this
  rank's columns) are read through safetensors' memory-mapped `get_slice` (a memory-mapped torch.load for .bin).
- Presets: `init="exact"` draws every full tensor from the preset's seeded generator (models/model.random_value, the
  single-process numbers, one tensor at a time) and keeps this rank's slice: the model equals the single-process preset.
  `init="local"` draws only this rank's slice, on the device, from a generator seeded by (seed, name, slice): fast for
  models no single process could hold (Jamba-1.5-Large); replicated tensors are equal on every rank.
Each returns the model and a fingerprint of what was loaded; ranks compare fingerprints (Mesh.check_same).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from contextlib import ExitStack
from pathlib import Path

import torch

from ..errors import CheckpointError, ParallelError
from ..models.checkpoint import check_weights_finite, detect_format, parse_dtype
from ..models.loaders.common import Piece
from ..models.model import random_value
from ..models.presets import PRESETS, preset_config
from .mesh import Mesh, check_layout
from .shard import build_local_model, full_parameter_shapes, local_shape, param_ranges, take

INITS = ("exact", "local")


def load_sharded(target, mesh: Mesh, dtype="fp32", device="cpu", seed: int = 0, init: str = "exact",
                 compare: bool = True):
    """-> (this rank's model in eval mode, fingerprint str). Checks that the layout fits the model and (compare) that
    every rank loads the same thing, before reading any weights; compare=False builds one rank's share alone (no
    process group needed)."""
    dtype = parse_dtype(dtype)
    if init not in INITS:
        raise ParallelError(f"unknown init {init!r}; one of {', '.join(INITS)}")
    if isinstance(target, str) and target in PRESETS:
        model, fingerprint = build_sharded(preset_config(target), mesh, dtype, device, seed, init, compare,
                                           label=f"preset {target}")
        model.source = {"kind": "preset", "name": target, "seed": seed, "init": init}
        return model, fingerprint
    path = Path(target)
    fmt = detect_format(path)
    with ExitStack() as stack:
        config, pieces, _, slicer, header = _open_checkpoint(fmt, path, stack)
        check_layout(mesh.layout, config)
        fingerprint = _digest({"format": fmt, "header": header, "config": config.to_dict()})
        if compare:
            mesh.check_same(fingerprint, "checkpoints (compared: each rank's config and weight-file headers)",
                            label=str(path))
        model = build_local_model(config, mesh, dtype, device)
        with torch.no_grad():
            _read_slices(model, config, mesh, pieces, slicer, str(path))
    check_weights_finite(model, path)
    model.source = {"kind": fmt, "path": str(path)}
    return model, fingerprint


def config_of(target):
    """The model config of a preset name or checkpoint directory (config files only, no weights)."""
    if isinstance(target, str) and target in PRESETS:
        return preset_config(target)
    path = Path(target)
    fmt = detect_format(path)
    if fmt == "native":
        from ..errors import read_json
        from ..models.config import ModelConfig

        meta = read_json(path / "mambadeploy.json", CheckpointError)
        return ModelConfig.from_dict(meta["config"], f"{path / 'mambadeploy.json'}: config")
    if fmt.startswith("hf-"):
        from ..models.loaders import hf

        return hf.read_config(path)
    if fmt == "blackmamba":
        from ..models.loaders import blackmamba

        return blackmamba.read_config(path)
    raise CheckpointError(f"{path}: the {fmt} format cannot be loaded sharded")


def build_sharded(config, mesh: Mesh, dtype=torch.float32, device="cpu", seed: int = 0, init: str = "exact",
                  compare: bool = True, label: str = ""):
    """This rank's share of a model of `config` with seeded random weights (a preset, or a shape of a benchmark)."""
    dtype = parse_dtype(dtype)
    check_layout(mesh.layout, config)
    fingerprint = _digest({"seed": seed, "init": init, "config": config.to_dict()})
    if compare:
        mesh.check_same(fingerprint, "checkpoints (compared: config, seed and init of the random weights)",
                        label=label or config.name)
    model = build_local_model(config, mesh, dtype, device)
    with torch.no_grad():
        (_init_exact if init == "exact" else _init_local)(model, config, mesh, seed)
    model.source = {"kind": "random", "seed": seed, "init": init}
    return model, fingerprint


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- presets
def _init_exact(model, config, mesh, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    params = dict(model.named_parameters())
    for name, shape in full_parameter_shapes(config).items():  # the single-process order: the same draws
        value = random_value(name, shape, g)
        params[name].copy_(take(value, param_ranges(name, shape, config, mesh)))


def _init_local(model, config, mesh, seed):
    params = dict(model.named_parameters())
    for name, shape in full_parameter_shapes(config).items():
        ranges = param_ranges(name, shape, config, mesh)
        p = params[name]
        key = int(_digest([seed, name, ranges]), 16) & ((1 << 62) - 1)
        g = torch.Generator(device=p.device).manual_seed(key)
        p.copy_(random_value(name, tuple(p.shape), g, fan_in=shape[-1]))


# --------------------------------------------------------------------------- checkpoints
def _open_checkpoint(fmt, path: Path, stack: ExitStack):
    """-> (config, pieces (planned on the full model), available {key: shape}, slicer(key, slices) -> tensor,
    header: what the fingerprint covers)."""
    from ..models.loaders import common
    from ..models.model import MambaMoELM

    config = config_of(path)
    if fmt == "native":
        files = [path / "model.safetensors"]
        if not files[0].exists():
            raise CheckpointError(f"{path}: model.safetensors is missing")
        where = _open_safetensors(stack, files)
        pieces = {name: Piece([name], [shape]) for name, shape in full_parameter_shapes(config).items()}
        ignored = ()
    elif fmt.startswith("hf-"):
        from ..models.loaders import hf

        files = hf._weight_files(path)
        where = _open_safetensors(stack, files)
        with torch.device("meta"):
            full = MambaMoELM(config)
        plan = hf.mamba_plan if fmt == "hf-mamba" else hf.jamba_plan
        available = {k: tuple(h.get_slice(k).get_shape()) for k, (h, _) in where.items()}
        pieces, ignored = plan(full, available)
    elif fmt == "blackmamba":
        from ..models.loaders import blackmamba

        state = blackmamba._load_state_dict(path / "pytorch_model.bin")  # memory-mapped: slices read only their pages
        with torch.device("meta"):
            full = MambaMoELM(config)
        pieces, ignored = blackmamba.plan(full), ()
        available = {k: tuple(v.shape) for k, v in state.items()}
        common.check_pieces(pieces, available, str(path), ignored)
        header = [sorted((k, list(v), str(state[k].dtype)) for k, v in available.items()),
                  _sample_digest([path / "pytorch_model.bin"])]
        return config, pieces, available, lambda key, sl: state[key][sl], header

    def slicer(key, slices):
        handle, f = where[key]
        try:
            return handle.get_slice(key)[slices]
        except Exception as exc:
            raise CheckpointError(f"{f}: cannot read {key}: truncated or corrupt safetensors file ({exc})") from exc

    available = {k: tuple(h.get_slice(k).get_shape()) for k, (h, _) in where.items()}
    common.check_pieces(pieces, available, str(path), ignored)
    header = [sorted((k, list(v), where[k][0].get_slice(k).get_dtype()) for k, v in available.items()),
              _sample_digest(files)]
    return config, pieces, available, slicer, header


SAMPLE_BYTES = 1 << 20


def _sample_digest(files) -> str:
    """Each weight file's size and its first and last MiB: two checkpoints of one shape (a base model and its
    fine-tune) differ there, and reading 2 MiB a file keeps the check cheap for any size."""
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(str(size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(SAMPLE_BYTES))
            fh.seek(max(size - SAMPLE_BYTES, 0))
            h.update(fh.read(SAMPLE_BYTES))
    return h.hexdigest()


def _open_safetensors(stack, files):
    from ..models.loaders import hf

    return hf._open_all(stack, files)


def _read_slices(model, config, mesh, pieces, slicer, source):
    from tqdm import tqdm

    params = dict(model.named_parameters())
    full_shapes = full_parameter_shapes(config)
    big = sum(p.numel() for p in params.values()) > (1 << 27)
    for name in tqdm(list(full_shapes), desc=f"rank {mesh.rank}: loading slices", unit="tensor", leave=False,
                     disable=None if big else True):
        ranges = param_ranges(name, full_shapes[name], config, mesh)
        value = read_piece(pieces[name], full_shapes[name], ranges, slicer)
        if tuple(value.shape) != tuple(params[name].shape):
            raise CheckpointError(f"{source}: internal error, {name} sliced as {tuple(value.shape)}, "
                                  f"rank {mesh.rank} holds {tuple(params[name].shape)}")
        params[name].copy_(value)


def read_piece(piece: Piece, full_shape: tuple, ranges, slicer) -> torch.Tensor:
    """The slice `ranges` of the parameter `piece` builds, reading only the source rows and columns it needs.

    A combine only concatenates or stacks along leading dims, so it is replayed on row numbers: each source becomes
    arange(rows) + offset, the combine gives the leading block of the full parameter as source row ids, `take` cuts this
    rank's ids out, and each run of consecutive rows of one source is one read (with the trailing dims' ranges)."""
    src_dims = len(piece.shapes[0])
    lead = len(full_shape) - (src_dims - 1)
    offsets, proxies = [0], []
    for shape in piece.shapes:
        proxies.append(torch.arange(shape[0]) + offsets[-1])
        offsets.append(offsets[-1] + shape[0])
    ids = take(piece.combine(proxies), ranges[:lead]).reshape(-1)
    source = torch.searchsorted(torch.tensor(offsets[1:]), ids, right=True)
    rows = ids - torch.tensor(offsets)[source]
    breaks = torch.ones(len(ids), dtype=torch.bool)
    breaks[1:] = (source[1:] != source[:-1]) | (rows[1:] != rows[:-1] + 1)
    starts = torch.nonzero(breaks, as_tuple=True)[0].tolist() + [len(ids)]
    blocks = []
    for a, b in itertools.pairwise(starts):
        key, first = piece.sources[int(source[a])], int(rows[a])
        blocks.append(_read_block(slicer, key, first, first + (b - a), ranges[lead:]))
    out = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
    return out.reshape(local_shape(ranges))


def _read_block(slicer, key, row0, row1, trailing):
    """Rows [row0, row1) of source `key`, with the trailing dims' ranges (one read per combination of ranges)."""

    def build(dim, prefix):
        if dim == len(trailing):
            return slicer(key, tuple(prefix))
        parts = [build(dim + 1, prefix + [slice(a, b)]) for a, b in trailing[dim]]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim + 1)

    return build(0, [slice(row0, row1)])
