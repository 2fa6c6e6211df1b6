"""SCAP in the reference model: the sparsifier's algebra (mask + folded bias), calibration (modes, thresholds, realised
sparsity), sparsity 0 bit-identical to the dense model, stepwise decode = full sequence, both MoE branches, round trip."""

import pytest
import torch
import torch.nn.functional as F

from mambadeploy.errors import InputError
from mambadeploy.models import sparsity
from mambadeploy.models.calibrate import calibrate, kde_peak, realised_sparsity, windows_from_tokens
from mambadeploy.models.checkpoint import load_model, save_model
from mambadeploy.models.presets import TINY_PRESETS
from mambadeploy.validate.tolerances import assert_logits_close

REALISED_SLACK = 0.03  # the bound: realised sparsity within +-3 points of the target


def _windows(vocab=512, n=4, length=32, seed=0):
    tokens = torch.randint(0, vocab, (4000,), generator=torch.Generator().manual_seed(seed))
    return windows_from_tokens(tokens, n, length)


@pytest.fixture(scope="module")
def sparse_models():
    """{preset: (dense, sparse at 0.5 with median centering)}, calibrated once."""
    out = {}
    for name in TINY_PRESETS:
        dense = load_model(name)
        out[name] = (dense, calibrate(dense, _windows(), 0.5, mode="median"))
    return out


def test_sparsifier_keeps_large_entries_exactly_and_folds_the_mode():
    torch.manual_seed(0)
    x, w, b = torch.randn(5, 33), torch.randn(7, 33), torch.randn(7)
    mode = 0.3
    keep_all = sparsity.Sparsifier(mode, -1.0, (7,))
    keep_all.folded_bias.data = (w.double().sum(-1) * mode).float()
    dense = F.linear(x, w, b)
    err = (keep_all.linear(x, w, b) - dense).abs().max().item()
    print(f"threshold -1 vs dense: max abs err {err:.2e}")
    assert err < 1e-5  # only the fold's reassociation
    drop_all = sparsity.Sparsifier(mode, 1e9, (7,))
    drop_all.folded_bias.data = keep_all.folded_bias.data
    assert torch.equal(drop_all.linear(x, w, b), (b + keep_all.folded_bias).expand(5, 7))
    t = 0.5
    zeroed = sparsity.sparsify_ref(x, mode, t)
    assert torch.equal(zeroed == 0, (x - mode).abs() <= t)
    assert torch.equal(zeroed[zeroed != 0], (x - mode)[(x - mode).abs() > t])


def test_kde_peak_finds_the_mode_of_a_skewed_distribution():
    g = torch.Generator().manual_seed(0)
    values = torch.cat([torch.randn(20000, generator=g) * 0.1 + 0.7, torch.rand(5000, generator=g) * 6 - 3])
    peak = kde_peak(values)
    print(f"kde peak {peak:.3f} (true 0.7), median {values.median():.3f}")
    assert abs(peak - 0.7) < 0.05


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_sparsity_zero_is_bit_identical_to_the_dense_model(preset):
    dense = load_model(preset)
    sparse = calibrate(dense, _windows(n=2, length=16), 0.0, mode="auto")
    assert sparse.config.sparsity["sites"] and all(s["threshold"] < 0 for s in sparse.config.sparsity["sites"].values())
    ids = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([11, 6])
    ld, sd = dense(ids, lengths)
    ls, ss = sparse(ids, lengths)
    assert torch.equal(ld, ls)
    tok = ld[:, -1].argmax(-1)
    assert torch.equal(dense.step(tok, sd)[0], sparse.step(tok, ss)[0])


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_calibration_reaches_the_target_and_decode_matches_the_sequence(preset, sparse_models):
    dense, sparse = sparse_models[preset]
    sites = sparse.config.sparsity["sites"]
    assert {s[0] for s in sparsity.sites(dense.config)} == set(sites)
    assert all(s["mode_kind"] == "median" for s in sites.values())
    held = _windows(seed=5)  # other tokens than the calibration's
    realised = realised_sparsity(sparse, held)
    print(f"{preset}: realised sparsity {realised['all']:.3f} (target 0.5)")
    assert abs(realised["all"] - 0.5) <= REALISED_SLACK
    ids = held[:2, :12]
    full, _ = sparse(ids)
    assert not torch.equal(full, dense(ids)[0])  # the sparsifiers do act
    logits, state = sparse.prefill(ids[:, :5])
    steps = [logits]
    for t in range(5, 12):
        logits, state = sparse.step(ids[:, t], state)
        steps.append(logits)
    assert_logits_close(torch.stack(steps[:-1], 1), full[:, 4:11], what=f"{preset} sparse step vs forward",
                        check="reference")


def test_sparse_moe_branches_agree(sparse_models):
    """All tokens at once (every expert + combine) vs one token at a time (gather of the chosen experts)."""
    _, sparse = sparse_models["jamba-tiny"]  # top-2 softmax, sparse fc1 and fc2 with folded biases
    moe = next(b.ffn for b in sparse.layers if b.kind.ffn == "moe")
    assert moe.sparse["fc1"].folded_bias is not None and moe.sparse["fc1"].folded_bias.shape == moe.w1.shape[:2]
    x = torch.randn(9, sparse.config.d_model, generator=torch.Generator().manual_seed(2))
    together = moe(x)
    alone = torch.cat([moe(x[i:i + 1]) for i in range(9)])
    assert_logits_close(alone, together, what="sparse MoE gather vs combine", check="reference")


def test_modes_zero_and_auto(sparse_models):
    dense = sparse_models["blackmamba-tiny"][0]
    zero = calibrate(dense, _windows(n=2), 0.3, groups=("in_proj", "fc2"), mode="zero")
    sites = zero.config.sparsity["sites"]
    assert {s["group"] for s in sites.values()} == {"in_proj", "fc2"}
    assert all(s["mode"] == 0.0 and s["mode_kind"] == "zero" for s in sites.values())
    assert not any(p.endswith("folded_bias") for p, _ in zero.named_parameters())  # mode 0 folds nothing
    auto = calibrate(dense, _windows(n=2), 0.3, groups=("x_proj",), mode="auto")
    for s in auto.config.sparsity["sites"].values():
        assert s["mode_kind"] in ("zero", "median", "kde")
        # auto keeps the least output error, so never worse than CATS (mode 0)
        assert s["output_error"] <= zero_error(dense, auto, s) + 1e-12


def zero_error(dense, auto, site_info):
    from mambadeploy.models.calibrate import _site_weights, _values, collect, output_error, threshold_for

    site = next(s for s in sparsity.sites(dense.config) if s[1] == site_info["group"])
    rows = collect(dense, _windows(n=2), [site])[site[0]]
    return output_error(rows, _site_weights(dense, site), 0.0, threshold_for(_values(rows), 0.0, 0.3))


def test_round_trip_and_bad_requests(tmp_path, sparse_models):
    dense, sparse = sparse_models["moe-mamba-tiny"]
    save_model(sparse, tmp_path / "ckpt")
    again = load_model(tmp_path / "ckpt")
    ids = torch.randint(0, 512, (1, 9))
    assert torch.equal(again(ids)[0], sparse(ids)[0])
    with pytest.raises(InputError, match=r"in \[0, 1\)"):
        calibrate(dense, _windows(n=1), 1.0)
    with pytest.raises(InputError, match="unknown layer name"):
        calibrate(dense, _windows(n=1), 0.5, groups=("in_proj", "ffn"))
    with pytest.raises(InputError, match="has none of them"):
        calibrate(dense, _windows(n=1), 0.5, groups=("attn",))
    with pytest.raises(InputError, match="already sparse"):
        calibrate(sparse, _windows(n=1), 0.5)
    with pytest.raises(InputError, match="empty"):
        windows_from_tokens(torch.zeros(0, dtype=torch.long), 4, 8)
