"""torch-fast on SCAP-sparse checkpoints: its decode step runs each SCAP site on the kernel of its per-site table
(runtime/fast_sparse.py) and must follow the sparse reference whatever the choice (on CPU the kernels run in Triton's
interpreter): logits within the measured fp32 bound of the logit scale at prefill and over decode steps, batch 1 and a
left-padded batch of 3. Tables: the default (Mamba sites on the dense GEMV with the sparsifier fused; experts on the
compacting GEMV at batch 1, on the dense grouped GEMM with the sparsifiers fused at batch 2), jamba-tiny's top-2 pairs
on the compacting GEMV, and a mix that covers the other kernels (in_proj compacting with the conv in its epilogue,
out_proj predicated, the batch-1 experts on the dense GEMVs with their sparsifiers)."""

import copy

import pytest
import torch
from components import DEV_INSTALL, require_module

from mambadeploy.models.calibrate import calibrate, windows_from_tokens
from mambadeploy.models.checkpoint import load_model
from mambadeploy.runtime.torch_fast import TorchFastRunner
from mambadeploy.validate.tolerances import assert_logits_close

require_module("triton", DEV_INSTALL)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def sparse_models():
    tokens = torch.randint(0, 512, (3000,), generator=torch.Generator().manual_seed(0))
    windows = windows_from_tokens(tokens, 4, 32)
    return {name: calibrate(load_model(name), windows, 0.5, mode="median").to(DEVICE)
            for name in ("blackmamba-tiny", "jamba-tiny")}


MIXED = {"in_proj": "compact", "out_proj": "predicated", "experts": "dense", "x_proj": "dense"}


@pytest.fixture(scope="module")
def trained_sparse():
    """The trained BlackMamba testbed, calibrated at 0.5 on held-out bytes: low-precision logits mean something."""
    from mambadeploy.models.trained import heldout_bytes

    held = heldout_bytes().long()
    model = calibrate(load_model("blackmamba-small-trained"), windows_from_tokens(held[:20000], 4, 32), 0.5,
                      mode="median")
    return model.to(DEVICE), held[30000:30012].view(2, 6).to(DEVICE)


@pytest.mark.parametrize("name, batch, sites, dtype", [
    ("blackmamba-tiny", 1, None, torch.float32), ("jamba-tiny", 3, {"experts": "compact"}, torch.float32),
    ("blackmamba-tiny", 1, MIXED, torch.float32), ("blackmamba-small-trained", 2, None, torch.float16)],
    ids=["blackmamba-b1-default", "jamba-b3-compact-experts", "blackmamba-b1-mixed", "trained-b2-default-fp16"])
def test_sparse_torch_fast_follows_the_sparse_reference(request, name, batch, sites, dtype):
    """fp16 on the trained model (the tiny presets' random-weight logits are near-ties). bf16 is not asserted: there
    both this table and the shipped path (identical errors, 0.05-0.21 of the scale over 3 steps on the trained model)
    flip inputs that sit within a bf16 rounding of a threshold, so the sparse model's bf16 logits are less stable
    than the dense model's; kernels/ tests cover bf16 op by op."""
    if name.endswith("trained"):
        model, ids = request.getfixturevalue("trained_sparse")
        model = copy.deepcopy(model).to(dtype)
    else:
        model = request.getfixturevalue("sparse_models")[name]
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(0, 512, (batch, 6), generator=g).to(DEVICE)
    runner = TorchFastRunner(model, use_cuda_graph=False, scap_sites=sites)
    assert runner.sparse and any(layer.sparse for layer in runner.layers)
    if name == "blackmamba-tiny" and sites is None:  # the default: dense Mamba sites need no transposed copy
        mamba = [layer.sparse for layer in runner.layers if layer.mixer == "mamba" and layer.sparse]
        moe = [layer.sparse for layer in runner.layers if layer.moe is not None and layer.sparse]
        assert mamba and all(site.wt is None for sp in mamba for site in sp.values())
        assert moe and all(sp["fc1"].wt is not None and sp["fc2"].wt is not None for sp in moe)
    lengths = torch.tensor([6, 3, 5][:batch], device=DEVICE)  # left-padded rows beside full ones
    ref, ref_state = model.prefill(ids, lengths)
    got, state = runner.prefill(ids, lengths)
    assert_logits_close(got, ref, dtype, what=f"{name} b{batch} sparse prefill", check="torch_fast")
    for step in range(3):
        token = ref.argmax(-1)  # teacher-forced on the reference's greedy tokens
        ref, ref_state = model.step(token, ref_state)
        got, state = runner.step(token, state)
        assert_logits_close(got, ref, dtype, what=f"{name} b{batch} sparse decode step {step}", check="torch_fast")
