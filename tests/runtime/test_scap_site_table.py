"""The per-site SCAP kernel table of torch-fast (runtime/fast_sparse.py): the default covers every (group, batch)
with a reason, overrides and the forced kernels resolve as the benchmark uses them, a target below an entry's minimum
falls back to the dense kernel, a site calibrated at target 0 runs dense unless the table is forced, and bad
overrides are one clear error."""

import pytest

from mambadeploy.errors import ConfigError
from mambadeploy.runtime.fast_sparse import GROUPS, KERNELS, MAX_BATCH, SITE_KERNELS, choose, site_table


def test_the_default_table_covers_every_site_and_batch_with_a_reason():
    keys = {(g, b) for g in GROUPS for b in range(1, MAX_BATCH + 1)}
    assert set(SITE_KERNELS) == keys
    for kernel, min_target, reason in SITE_KERNELS.values():
        assert kernel in KERNELS and 0.0 <= min_target < 1.0 and len(reason) > 20


def test_forced_and_shipped_tables():
    assert {v[0] for v in site_table("shipped").values()} == {"predicated"}
    assert {v[0] for v in site_table("dense").values()} == {"dense"}
    assert site_table(None) == site_table("default") == SITE_KERNELS


def test_overrides_by_group_or_by_group_and_batch():
    table = site_table({"in_proj": "compact", ("experts", 1): ("compact", 0.3)})
    assert all(table[("in_proj", b)][0] == "compact" for b in range(1, MAX_BATCH + 1))
    assert table[("experts", 1)][:2] == ("compact", 0.3)
    assert table[("x_proj", 1)] == SITE_KERNELS[("x_proj", 1)]


def test_choice_by_target_and_pairs():
    table = site_table({("experts", 1): ("compact", 0.5), ("in_proj", 1): ("predicated", 0.4)})
    assert choose(table, "experts", 1, 0.5) == "compact"
    assert choose(table, "experts", 1, 0.3) == "dense"  # below the entry's minimum target
    assert choose(table, "in_proj", 1, 0.3) == "dense"
    assert choose(site_table("dense"), "experts", 2, 0.5) == "dense"
    # a site calibrated at target 0 (identity sparsifier) is dense, unless the table is forced (the shipped A/B)
    assert choose(site_table({"in_proj": "compact"}), "in_proj", 1, 0.0, identity=True) == "dense"
    assert choose(site_table("shipped"), "in_proj", 1, 0.0, identity=True) == "predicated"


@pytest.mark.parametrize("spec", ["fastest", {"in_proj": "sparse"}, {"mlp": "dense"}, {("in_proj", 9): "dense"}])
def test_bad_tables_are_one_clear_error(spec):
    with pytest.raises(ConfigError, match="SCAP site"):
        site_table(spec)
