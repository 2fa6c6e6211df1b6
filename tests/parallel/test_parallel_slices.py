"""One rank's share, without processes: layouts parsed and refused, each rank's slices equal to the single-process
model's parameters cut by param_ranges (presets built directly sharded, every checkpoint format), and the loader
reading no more than the slices."""

from __future__ import annotations

import pytest
import torch
from parallel_models import save_hf_jamba

from mambadeploy.errors import ParallelError
from mambadeploy.models.checkpoint import load_model, save_model
from mambadeploy.models.loaders.blackmamba import save_blackmamba
from mambadeploy.models.presets import preset_config
from mambadeploy.parallel.load import load_sharded, read_piece
from mambadeploy.parallel.mesh import Mesh, check_layout, parse_layout
from mambadeploy.parallel.shard import local_shape, param_ranges, take

LAYOUTS = ("tp=2", "ep=2", "tp=2,ep=2", "tp=2,ep=2,world=4", "tp=4,ep=2")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_hf_jamba(tmp_path_factory.mktemp("hf_jamba_parallel"))


def _check_every_rank(target, full, layout_text, init="exact"):
    layout = parse_layout(layout_text)
    params = dict(full.named_parameters())
    for rank in range(layout.world):
        mesh = Mesh(layout, rank)
        local, _ = load_sharded(target, mesh, init=init, compare=False)
        for name, p in local.named_parameters():
            ranges = param_ranges(name, tuple(params[name].shape), full.config, mesh)
            assert torch.equal(p, take(params[name], ranges)), f"rank {rank}: {name}"
        # its state is its share: Mamba channels / tp, its KV heads
        for spec_local, spec_full in zip(local.state_specs(), full.state_specs()):
            if spec_full.name.endswith((".conv", ".ssm")):
                assert spec_local.shape[1] == spec_full.shape[1] // layout.tp


@pytest.mark.parametrize("layout", LAYOUTS)
def test_presets_built_sharded_equal_the_single_process_preset(tiny, preset, layout):
    _check_every_rank(preset, tiny(preset), layout)


@pytest.mark.parametrize("layout", ["tp=2", "tp=2,ep=2,world=4"])
def test_checkpoint_slices_every_format(tmp_path, tiny, hf_dir, layout):
    jamba = tiny("jamba-tiny")
    _check_every_rank(str(save_model(jamba, tmp_path / "native")), jamba, layout)
    bm = tiny("blackmamba-tiny")
    _check_every_rank(str(save_blackmamba(bm, tmp_path / "bm")), bm, layout)
    _check_every_rank(hf_dir, load_model(hf_dir), layout)


def test_loader_reads_only_the_slices():
    """read_piece asks the file for exactly the local elements: stacked experts, [gate; up] halves, [x; z] rows."""
    from mambadeploy.models.loaders.common import Piece
    from mambadeploy.models.loaders.hf import _stack_gate_up

    config = preset_config("jamba-tiny")
    E, F, d = config.moe.n_experts, config.moe.ffn_size, config.d_model
    g = torch.Generator().manual_seed(0)
    sources = {f"e{e}.{part}": torch.randn(F, d, generator=g) for part in ("gate", "up") for e in range(E)}
    piece = Piece([f"e{e}.gate" for e in range(E)] + [f"e{e}.up" for e in range(E)], [(F, d)] * (2 * E),
                  _stack_gate_up)
    full = _stack_gate_up([sources[k] for k in piece.sources])
    read = []

    def slicer(key, slices):
        out = sources[key][slices]
        read.append(out.numel())
        return out

    for rank in range(4):
        mesh = Mesh(parse_layout("tp=2,ep=2,world=4"), rank)
        ranges = param_ranges("layers.1.ffn.w1", tuple(full.shape), config, mesh)
        read.clear()
        got = read_piece(piece, tuple(full.shape), ranges, slicer)
        assert torch.equal(got, take(full, ranges))
        assert sum(read) == got.numel() == full.numel() // 4, (sum(read), got.numel())


def test_layout_parsing_and_refusals():
    assert parse_layout("tp=2,ep=2") == parse_layout("tp=2,ep=2,world=2,dispatch=auto")
    assert parse_layout("ep=2", world=4).world == 4
    for bad, words in (("tp=two", "positive integer"), ("pp=2", "expected comma-separated"),
                       ("tp=2,dispatch=scatter", "dispatch must be"), ("tp=0", "positive integer")):
        with pytest.raises(ParallelError, match=words):
            parse_layout(bad)
    with pytest.raises(ParallelError, match="names world=4 but 2 ranks"):
        parse_layout("tp=2,world=4", world=2)
    jamba = preset_config("jamba-tiny")  # d_inner 96, 4 heads / 2 KV heads, 4 experts of width 64, MLP 64
    with pytest.raises(ParallelError) as err:
        check_layout(parse_layout("tp=3,ep=3"), jamba)
    message = str(err.value)
    print(message)
    assert "attention heads 4 are not divisible by tp=3" in message
    assert "KV heads 2 neither divide nor are divisible by tp=3" in message
    assert "4 experts are not divisible by ep=3" in message and "dense MLP width 64" in message
    with pytest.raises(ParallelError, match="Mamba d_inner 128 is not divisible by tp=3"):
        check_layout(parse_layout("tp=3"), preset_config("blackmamba-tiny"))
    with pytest.raises(ParallelError, match="world size 4 is not a multiple of tp=3"):
        check_layout(parse_layout("tp=3", world=4), jamba)
    # load_sharded refuses before any weight is read or any collective runs
    with pytest.raises(ParallelError, match="does not fit jamba-tiny"):
        load_sharded("jamba-tiny", Mesh(parse_layout("tp=3"), 0))


def test_local_init_is_sharded_and_replicas_agree():
    """init='local' (models no process could hold whole): each slice drawn alone; replicated tensors equal on every
    rank, split ones differ, scales follow the full fan-in."""
    layout = parse_layout("tp=2")
    a, _ = load_sharded("jamba-tiny", Mesh(layout, 0), init="local", compare=False)
    b, _ = load_sharded("jamba-tiny", Mesh(layout, 1), init="local", compare=False)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert torch.equal(pa["embedding.weight"], pb["embedding.weight"])
    assert torch.equal(pa["layers.1.ffn.router.weight"], pb["layers.1.ffn.router.weight"])
    assert not torch.equal(pa["layers.0.mixer.in_proj.weight"], pb["layers.0.mixer.in_proj.weight"])
    out = pa["layers.0.mixer.out_proj.weight"]  # (d, d_inner / 2): std 1/sqrt(d_inner), not 1/sqrt(d_inner / 2)
    assert abs(out.std().item() * (96 ** 0.5) - 1) < 0.15
    assert local_shape(param_ranges("layers.0.mixer.in_proj.weight", (192, 48), a.full_config, Mesh(layout, 0))) \
        == tuple(pa["layers.0.mixer.in_proj.weight"].shape)
