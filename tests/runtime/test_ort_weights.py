"""One copy of an export's external weights for all its ORT sessions (runtime/ort_weights.py): the sessions get the
same OrtValues (by the bytes they point at, not by name) and compute exactly what sessions with their own copies do."""

from __future__ import annotations

import pytest
import torch
from components import DEV_INSTALL, require_module

from mambadeploy.models.checkpoint import load_model


@pytest.fixture(scope="module")
def external_export(tmp_path_factory):
    """jamba-tiny exported with --prefill-state, its weights forced into the external data file."""
    require_module("onnxruntime", DEV_INSTALL)
    from mambadeploy.export import exporter

    directory = tmp_path_factory.mktemp("external") / "x"
    saved, exporter.EXTERNAL_DATA_BYTES = exporter.EXTERNAL_DATA_BYTES, 0
    try:
        exporter.export_model(load_model("jamba-tiny"), directory, ops="portable", prefill_state=True)
    finally:
        exporter.EXTERNAL_DATA_BYTES = saved
    return directory


def _run(runner, ids):
    logits, state = runner.prefill(ids)
    out = [logits]
    for _ in range(4):
        logits, state = runner.step(logits.argmax(-1), state)
        out.append(logits)
    return torch.stack(out)


@pytest.mark.parametrize("provider", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_sessions_share_one_copy_of_the_weights(external_export, provider):
    from mambadeploy.runtime.ort_runner import OrtRunner, _ort
    from mambadeploy.runtime.ort_weights import external_tensors

    if provider == "cuda" and "CUDAExecutionProvider" not in _ort().get_available_providers():
        pytest.skip("needs onnxruntime-gpu and a CUDA GPU")
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    shared = OrtRunner(external_export, provider, share_weights=True, prefill_chunk=4)
    own = OrtRunner(external_export, provider, share_weights=False, prefill_chunk=4)
    assert own.shared_weights is None and shared.shared_weights is not None
    a, b = _run(shared, ids), _run(own, ids)
    print(f"shared vs own copies ({provider}): max abs diff {(a - b).abs().max():.3e}")
    assert torch.equal(a, b)
    graphs = [external_export / g.file for g in shared.manifest.graphs.values()]
    named = [entry for g in graphs for entry in external_tensors(g)]
    keys = {key for _, key, _, _ in named}
    assert len(shared.sessions) == 3 and len(named) > len(keys)  # three graphs name the same bytes
    assert set(shared.shared_weights.values) == keys  # one OrtValue per distinct tensor, handed to every session
    assert shared.shared_weights.bytes() == sum(key[2] for key in keys)
