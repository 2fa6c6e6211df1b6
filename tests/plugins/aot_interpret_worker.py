"""Subprocess half of test_aot_interpreted.py: started with TRITON_INTERPRET=1 (so the AOT adapters are decorated as
interpreter functions), it runs every case given as JSON on argv[1] through aot_check.run_interpreted and saves inputs
and outputs to argv[2] (torch.save). The parent compares with the `_ref` — this process only runs kernels."""

from __future__ import annotations

import json
import os
import sys

import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("run with TRITON_INTERPRET=1")

from mambadeploy.plugins import aot_check  # noqa: E402


def main(cases_json: str, out_path: str) -> None:
    results = {}
    for case in json.loads(cases_json):
        maker = aot_check.INPUT_MAKERS[case["op"]]
        inputs = maker(**case["dims"], dtype=case["dtype"], device="cpu", seed=case["seed"])
        choice = [tuple(x.shape) for x in maker(**case["choice_dims"], dtype=case["dtype"], device="meta")]
        outputs = aot_check.run_interpreted(case["op"], inputs, case["attrs"], choice_shapes=choice)
        results[case["id"]] = {"inputs": inputs, "outputs": outputs}
    torch.save(results, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
