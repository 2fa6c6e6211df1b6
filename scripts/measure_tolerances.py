"""Measure the clean fp32 errors behind validate/tolerances.py: run the op-parity and logits tests in this process with
tolerances.MEASUREMENTS collecting every comparison's max error, and write the worst per op (and for logits).

    PYTHONPATH=$PWD python scripts/measure_tolerances.py --out benchmarks/results/tolerances_measured_cpu.json

While measuring, the comparisons use the loose pre-measurement bounds (OP / LOGITS_REL), so the measurement does not
depend on the bounds it sets. The JSON keeps every dtype; the fp32 CPU rows are what OP_FP32_CPU / LOGITS_FP32_CPU /
STATE_FP32_CPU copy. --only runs one group and keeps the other group's measurement in an existing --out file.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OP_TESTS = [
    "tests/kernels/test_kernel_causal_conv1d.py", "tests/kernels/test_kernel_decode_attention.py",
    "tests/kernels/test_kernel_gemv.py", "tests/kernels/test_kernel_moe.py", "tests/kernels/test_kernel_rms_norm.py",
    "tests/kernels/test_kernel_selective_scan.py", "tests/kernels/test_kernel_sparse_gemv.py",
    "tests/kernels/test_kernel_state_update.py", "tests/export/test_portable_ops.py", "tests/models/test_oracle.py",
    "tests/models/test_decode_consistency.py", "tests/plugins/test_aot_interpreted.py",
    "tests/plugins/test_ort_decode_ops.py", "tests/plugins/test_ort_custom_ops.py",
]
# model-level checks (logits and states, tagged by their check): these files plus the op files that hold a model-level
# comparison too (the oracle, decode consistency, the custom-op export in the ORT runner)
LOGITS_TESTS = [
    "tests/models/test_hf_parity.py", "tests/models/test_scap.py", "tests/runtime/test_torch_fast.py",
    "tests/runtime/test_torch_fast_sparse.py", "tests/runtime/test_long_context.py", "tests/runtime/test_ort_runner.py",
    "tests/export/test_export.py", "tests/export/test_scap_export.py", "tests/models/test_oracle.py",
    "tests/models/test_decode_consistency.py", "tests/plugins/test_ort_custom_ops.py",
]
# which summary kinds each group owns: a run of one group replaces only its kinds in an existing results file
GROUP_KINDS = {"op": ("op",), "logits": ("logits", "state")}


def summarize(rows: list[dict]) -> dict:
    """{kind: {op: {dtype: {"worst": .., "mean_of_max": .., "count": .., "worst_case": what}}}} over the CPU rows."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["kind"], r["op"] or "(no op key)", r["dtype"], r["device"])].append(r)
    out: dict = defaultdict(lambda: defaultdict(dict))
    for (kind, op, dtype, device), rs in sorted(groups.items()):
        worst = max(rs, key=lambda r: r["max_err"])
        per_test: dict = {}
        for r in rs:
            per_test[r["test"]] = max(per_test.get(r["test"], 0.0), r["max_err"])
        out[kind][op][f"{dtype}/{device}"] = {"worst": worst["max_err"], "worst_case": f"{worst['test']}: {worst['what']}",
                                              "count": len(rs),
                                              "mean_of_max": sum(r["max_err"] for r in rs) / len(rs),
                                              "worst_tests": dict(sorted(per_test.items(), key=lambda t: -t[1])[:5])}
    return json.loads(json.dumps(out))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/tolerances_measured_cpu.json"))
    parser.add_argument("--only", choices=["op", "logits"], help="run one group of tests only")
    args = parser.parse_args(argv)

    import pytest
    import torch

    from mambadeploy.validate import tolerances

    class Recorder(list):
        """MEASUREMENTS that tags each row with the running test; failed tests are left out of the summary."""
        __hash__ = object.__hash__  # pytest registers plugins in a set

        def __init__(self):
            super().__init__()
            self.current, self.failed = None, set()

        def append(self, row):
            super().append({**row, "test": self.current})

        def pytest_runtest_setup(self, item):
            self.current = item.nodeid

        def pytest_runtest_logreport(self, report):
            if report.failed:
                self.failed.add(report.nodeid)

    groups = [args.only] if args.only else ["op", "logits"]
    files = list(dict.fromkeys((OP_TESTS if "op" in groups else []) + (LOGITS_TESTS if "logits" in groups else [])))
    recorder = tolerances.MEASUREMENTS = Recorder()
    start = time.perf_counter()
    rc = pytest.main(["-q", "-p", "no:cacheprovider", "-m", "not gpu", *[str(ROOT / f) for f in files]],
                     plugins=[recorder])
    rows = [r for r in recorder if r["test"] not in recorder.failed]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() and args.only else {"runs": {}, "summary": {}}
    summary = summarize(rows)
    for group in groups:  # a group's kinds are replaced whole; the other group's stay as measured before
        for kind in GROUP_KINDS[group]:
            result["summary"].pop(kind, None)
            if kind in summary:
                result["summary"][kind] = summary[kind]
        result["runs"][group] = {"commit": commit, "pytest_rc": int(rc), "tests": files,
                                 "seconds": round(time.perf_counter() - start, 1),
                                 "failed_tests_left_out": sorted(recorder.failed)}
    result.update({"what": "max abs error / max(max|expected|, 1) of each comparison in the tests (op outputs per op; "
                           "logits and state tensors per model-level check), clean code; the fp32 bounds in "
                           "mambadeploy/validate/tolerances.py are FP32_FACTOR x the float32/cpu worst",
                   "commit": commit, "torch": torch.__version__, "machine": platform.machine()})
    result = {k: result[k] for k in ("what", "commit", "torch", "machine", "runs", "summary")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for kind, ops in result["summary"].items():
        for op, by in ops.items():
            fp32 = by.get("float32/cpu")
            if fp32:
                print(f"{kind:6s} {op:20s} fp32 cpu worst {fp32['worst']:.3e} over {fp32['count']} ({fp32['worst_case']})")
    print(f"wrote {args.out} (pytest rc {rc})")
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
