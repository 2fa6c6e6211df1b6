"""torch-fast's persistent batch-1 decode step (kernels/decode_persistent.py: every block in one launch) against the
reference and against torch-fast's per-kernel step.

On CPU the kernel runs in Triton's interpreter with one program (programs run one after another there, so a grid
barrier with more than one could never open): the maths and the block table are checked, the multi-program partition
and the barriers only on a GPU (marked gpu), where the full checks run (256 fp32 tokens, real BlackMamba-2.8B widths)."""

from __future__ import annotations

import pytest
import torch
from stepping import follow_greedy

from mambadeploy.errors import ConfigError
from mambadeploy.kernels import decode_persistent as kp
from mambadeploy.models.checkpoint import build_preset, empty_model, init_random_
from mambadeploy.models.presets import blackmamba_config
from mambadeploy.runtime.generate import generate
from mambadeploy.runtime.torch_eager import TorchEagerRunner
from mambadeploy.runtime.torch_fast import TorchFastRunner, persistent_unsupported
from mambadeploy.validate.tolerances import assert_logits_close

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
FITS = ("blackmamba-tiny", "moe-mamba-tiny")  # the tiny presets the persistent step takes (Jamba does not fit)
PROMPT = [[5, 17, 3, 99, 42, 7, 250]]

pytestmark = pytest.mark.usefixtures("no_grad")


def _model(tiny, name, dtype="fp32"):
    model = tiny(name, dtype)
    if DEVICE == "cpu":
        return model
    import copy

    return copy.deepcopy(model).to("cuda")


def _follow_the_per_kernel_step(model, prompt, steps, what):
    """torch-fast per kernel and persistent, both following the per-kernel runner's greedy tokens from prompt for
    `steps` steps; each step's logits within the model dtype's bound of the per-kernel ones (max / mean error printed),
    no barrier timed out. -> (per-kernel state, persistent state)."""
    sa, sb = follow_greedy(TorchFastRunner(model, persistent=False), TorchFastRunner(model, persistent=True), prompt,
                           steps, lambda lb, la: assert_logits_close(lb, la, model.dtype,
                                                                        what=f"{what} persistent step"))
    sb.persistent.check()
    return sa, sb


@pytest.mark.parametrize("name", FITS)
def test_greedy_tokens_match_the_reference(tiny, name):
    """fp32, batch 1: the reference's greedy tokens (256 on a GPU; 12 on CPU, where the interpreter is slow), and no
    barrier timed out."""
    model = _model(tiny, name)
    runner = TorchFastRunner(model, persistent=True)
    n = 256 if GPU else 12
    fast = generate(runner, PROMPT, n)
    ref = generate(TorchEagerRunner(model), PROMPT, n)
    print(f"{name}: {n} tokens, first {fast.tokens[0][:8]}")
    assert fast.tokens == ref.tokens
    assert runner.persistent


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", FITS)
def test_step_equals_the_per_kernel_step(tiny, name, dtype):
    """Each step's logits against torch-fast's per-kernel step (the same roundings, only summation orders differ),
    for 40 steps on a GPU (6 on CPU), following the per-kernel runner's greedy tokens; the state tensors too."""
    model = _model(tiny, name, dtype)
    sa, sb = _follow_the_per_kernel_step(model, torch.tensor(PROMPT), 40 if GPU else 6, f"{name} {dtype}")
    assert sb.persistent is not None and sa.persistent is None
    for key, value in sa.tensors.items():
        assert_logits_close(sb.tensors[key].flatten()[None], value.flatten()[None], model.dtype, what=key)


def test_wider_batches_keep_the_per_kernel_step(tiny):
    """Batch 2 on a persistent runner takes the per-kernel step (the persistent step is batch 1 only)."""
    runner = TorchFastRunner(_model(tiny, "blackmamba-tiny"), persistent=True)
    _, state = runner.prefill(torch.tensor([[1, 2, 3], [4, 5, 6]]))
    runner.step(torch.tensor([7, 8]), state)
    assert state.persistent is None


def test_models_that_do_not_fit_are_refused(tiny, monkeypatch):
    """Jamba (attention, dense MLP blocks, dt/B/C norms, top-2 router) is refused when asked for; the default is off;
    MAMBADEPLOY_PERSISTENT=1 turns it on where the model fits and the step runs on a GPU."""
    jamba = tiny("jamba-tiny")
    assert "Mamba-only or MoE-only" in persistent_unsupported(jamba.config)
    with pytest.raises(ConfigError, match="persistent=False"):
        TorchFastRunner(jamba, persistent=True)
    assert TorchFastRunner(jamba).persistent is False
    assert TorchFastRunner(tiny("blackmamba-tiny")).persistent is False  # CPU models: off unless asked for
    assert TorchFastRunner(_model(tiny, "blackmamba-tiny")).persistent is False  # off by default (slower, measured)
    monkeypatch.setenv("MAMBADEPLOY_PERSISTENT", "1")
    assert TorchFastRunner(_model(tiny, "blackmamba-tiny")).persistent is GPU
    assert TorchFastRunner(jamba).persistent is False


def test_block_table_refuses_bad_tensors():
    """Every tensor the kernel reaches through the table must be contiguous, on the device, fp32 for the state and
    SSM vectors and the model dtype elsewhere; the table holds their addresses."""
    w = torch.randn(8, 4)
    table = kp.block_table([{"kind": kp.MAMBA, "in_w": w, "A": torch.randn(4, 2)}], "cpu", torch.float32)
    assert table.shape == (1, kp.N_COLS.value) and table[0, kp.IN_W.value] == w.data_ptr()
    assert table[0, kp.CONV_B.value] == 0
    with pytest.raises(ValueError, match="contiguous"):
        kp.block_table([{"kind": kp.MAMBA, "in_w": w.t()}], "cpu", torch.float32)
    with pytest.raises(ValueError, match="torch.float32"):
        kp.block_table([{"kind": kp.MAMBA, "in_w": w.bfloat16(), "A": torch.randn(4, 2).bfloat16()}], "cpu",
                       torch.bfloat16)
    with pytest.raises(ValueError, match="top-1"):
        kp.PersistentDecode({"router": "softmax_topk", "top_k": 2, "activation": "silu"}, table, w)


@needs_gpu
@pytest.mark.gpu
def test_full_width_blocks_on_the_gpu():
    """BlackMamba-2.8B widths (d 1472, d_inner 2944, 8 experts of 3872), four blocks, bf16 and fp32: the persistent
    step (all programs resident: every row share and channel share in use) against the per-kernel step for 32 steps."""
    for dtype in (torch.bfloat16, torch.float32):
        config = blackmamba_config(4, 1472, 3872, name="bm-2.8b-wide-4")
        model = init_random_(empty_model(config, dtype, "cuda"), seed=0).eval()
        prompt = torch.randint(0, model.config.vocab_size, (1, 16), device="cuda")
        _follow_the_per_kernel_step(model, prompt, 32, f"2.8B-wide {dtype}")


@needs_gpu
@pytest.mark.gpu
def test_seeded_preset_shape_runs_on_the_gpu():
    """The real blackmamba-1.5b preset (seeded weights, bf16): graph-captured persistent steps equal uncaptured ones."""
    model = build_preset("blackmamba-1.5b", dtype=torch.bfloat16, device="cuda")
    graphed = TorchFastRunner(model, persistent=True)
    plain = TorchFastRunner(model, persistent=True, use_cuda_graph=False)
    prompt = torch.tensor([[11, 2, 301, 7]], device="cuda")
    sa, _ = follow_greedy(graphed, plain, prompt, 8,
                          lambda lb, la: torch.testing.assert_close(la, lb, rtol=0, atol=0))
    assert sa.graph is not None
    sa.persistent.check()
