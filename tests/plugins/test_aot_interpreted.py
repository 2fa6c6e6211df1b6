"""The AOT adapters (plugins/aot_kernels.py) run in Triton's CPU interpreter with exactly the launch numbers an engine
would use — grid and int32 scalars from aot.SPECS, constexprs chosen at an "engine opt shape" other than the shape run —
and compared with the `_ref`. CI's check of each adapter's strides, scalars and grid formula (and of the fused
TopKExpertGather kernel's math); the same adapters compiled to PTX and launched on a GPU are test_aot_gpu.py.

The interpreter must be on when the adapters are decorated, so one subprocess (aot_interpret_worker.py, started with
TRITON_INTERPRET=1) runs all cases; each test then checks its case."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from components import DEV_INSTALL, require_module

from mambadeploy.opset import get_op
from mambadeploy.plugins import aot_check
from mambadeploy.validate.tolerances import op_checker

check_op = op_checker("aot_interpreted")  # fp32 on the CPU: this op's measured bound

require_module("triton", DEV_INSTALL)

HERE = Path(__file__).resolve().parent
# (op, dims, attrs, the opt dims that fix the constexprs); small awkward shapes: L 1 / 33 / 154, widths off blocks
CASES = {
    "scan-L1": ("SelectiveScan", dict(batch=1, dim=5, L=1, d_state=4), {"delta_softplus": 1},
                dict(batch=2, dim=5, L=64, d_state=4)),
    "scan-L33": ("SelectiveScan", dict(batch=3, dim=21, L=33, d_state=16), {"delta_softplus": 1},
                 dict(batch=2, dim=21, L=64, d_state=16)),
    "conv-L1": ("CausalConv1d", dict(batch=1, dim=33, L=1, K=4), {"activation": 1},
                dict(batch=2, dim=33, L=64, K=4)),
    "conv-L154": ("CausalConv1d", dict(batch=3, dim=70, L=154, K=4), {"activation": 0},
                  dict(batch=2, dim=70, L=64, K=4)),
    "gather-top1": ("TopKExpertGather", dict(tokens=1, d=24, F=10, experts=3, top_k=1), {"activation": 0, "top_k": 1},
                    dict(tokens=4, d=24, F=10, experts=3, top_k=1)),
    "gather-top2": ("TopKExpertGather", dict(tokens=7, d=40, F=20, experts=4, top_k=2), {"activation": 1, "top_k": 2},
                    dict(tokens=4, d=40, F=20, experts=4, top_k=2)),
    "gather-wide": ("TopKExpertGather", dict(tokens=3, d=300, F=18, experts=3, top_k=1), {"activation": 2, "top_k": 1},
                    dict(tokens=4, d=300, F=18, experts=3, top_k=1)),  # d > BLOCK_N: two column blocks per token
    # the decode step's ops: batch 1 and 3, widths off the blocks
    "conv-update": ("CausalConv1dUpdate", dict(batch=3, dim=33, K=4), {"activation": 1},
                    dict(batch=1, dim=33, K=4)),
    "state-update": ("SelectiveStateUpdate", dict(batch=3, dim=21, d_state=16), {"dt_softplus": 1},
                     dict(batch=1, dim=21, d_state=16)),
    "add-rms-norm": ("AddRMSNorm", dict(rows=3, d=70), {"epsilon": 1e-5}, dict(rows=1, d=70)),
    "sparse-linear": ("SparseLinear", dict(rows=3, K=150, N=70), {"mode": 0.1, "threshold": 0.6},
                      dict(rows=1, K=150, N=70)),  # K and N off the 64 blocks; ~45 % of the features dropped
    "moe-sigmoid": ("RoutedMoE", dict(tokens=1, d=24, F=10, experts=5), {"router": 0, "activation": 0},
                    dict(tokens=4, d=24, F=10, experts=5)),
    "moe-top2": ("RoutedMoE", dict(tokens=3, d=300, F=12, experts=6), {"router": 1, "top_k": 2, "activation": 1},
                 dict(tokens=4, d=300, F=12, experts=6)),
}
DTYPES = ["float32", "bfloat16"]


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    cases = [{"id": f"{cid}-{dt}", "op": op, "dims": dims, "attrs": attrs, "choice_dims": choice, "dtype": dt,
              "seed": i} for i, (cid, (op, dims, attrs, choice)) in enumerate(CASES.items()) for dt in DTYPES]
    out = tmp_path_factory.mktemp("aot_interp") / "results.pt"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(HERE.parents[1]), str(HERE)]))
    r = subprocess.run([sys.executable, str(HERE / "aot_interpret_worker.py"), json.dumps(cases), str(out)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_adapter_matches_ref_in_interpreter(interpreted, case, dtype):
    op, _, attrs, _ = CASES[case]
    got = interpreted[f"{case}-{dtype}"]
    refs = aot_check.reference(op, got["inputs"], attrs)
    for name, out, ref in zip(get_op(op).outputs, got["outputs"], refs):
        assert torch.isfinite(out.float()).all(), f"{name}: elements the kernel never wrote (NaN-poisoned) remain"
        # the inputs' dtype sets the tolerance for every output (an fp32 state fed by bf16 inputs has bf16 error)
        check_op(out, ref, aot_check.TORCH_DTYPES[dtype], f"{case} {dtype} {name}")
