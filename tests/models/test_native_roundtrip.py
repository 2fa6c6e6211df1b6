"""Our own format: save_model / load_model round-trip bit-exactly (config and every tensor)."""

import pytest
import torch

from mambadeploy import load_model, save_model

pytestmark = pytest.mark.usefixtures("no_grad")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_round_trip_is_bit_exact(tiny, preset, dtype, tmp_path):
    model = tiny(preset, dtype)
    save_model(model, tmp_path)
    loaded = load_model(tmp_path, dtype=dtype)
    assert loaded.config == model.config
    assert loaded.source["kind"] == "native"
    a, b = model.state_dict(), loaded.state_dict()
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(ids)[0], loaded(ids)[0])
