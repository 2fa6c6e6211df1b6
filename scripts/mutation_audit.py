"""Mutation audit: plant each known subtle bug in a copy of the source and check that the suite catches it, at op level
and by more than one test.

    PYTHONPATH=$PWD python scripts/mutation_audit.py --out benchmarks/results/mutation_audit_cpu.json [--only NAME]

Each mutation is a one-line text edit (it must match exactly once) applied to a copy of the working tree (mambadeploy/,
tests/, pyproject.toml) under a temporary directory; the listed tests run there with PYTHONPATH pointing at the copy,
and a JUnit report names the failures. The clean tree must pass the same tests (the audit runs them once unmutated
first, unless --skip-clean), so every failure counts as a catch. Tests are picked per bug: the op-level parity tests of
the op it touches (kernel / portable ONNX / ORT C++ vs the reference) and the model-level tests (transformers parity,
the independent oracle, ORT runner vs torch) that should see it too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("mambadeploy", "tests", "pyproject.toml")

ORT_RUNNER = "tests/runtime/test_ort_runner.py::test_prefill_and_128_decode_steps_match_torch"
# name -> (file, exact old text, new text, op-level tests, model-level tests)
MUTATIONS = {
    "d_term_sign": {
        "file": "mambadeploy/models/ref_ops.py", "old": "y = y + u * D.float()[None, :, None]",
        "new": "y = y - u * D.float()[None, :, None]",
        "op": ["tests/kernels/test_kernel_selective_scan.py::test_selective_scan_matches_ref",
            "tests/export/test_portable_ops.py::test_selective_scan",
            "tests/plugins/test_ort_custom_ops.py::test_selective_scan_cpu"],
        "model": ["tests/models/test_hf_parity.py::test_logits_match_transformers",
               "tests/models/test_oracle.py::test_model_oracle_matches_left_padded_batch"]},
    "router_choice": {
        "file": "mambadeploy/models/ref_ops.py", "old": "weights, idx = torch.topk(probs, top_k, dim=-1)",
        "new": "weights, idx = torch.topk(probs, top_k, dim=-1, largest=False)",
        "op": ["tests/kernels/test_kernel_moe.py::test_route_matches_ref",
            "tests/export/test_portable_ops.py::test_expert_gather",
            "tests/plugins/test_ort_custom_ops.py::test_expert_gather_cpu",
            "tests/models/test_oracle.py::test_moe_oracle_matches_static_gather"],
        "model": ["tests/models/test_hf_parity.py::test_routed_jamba_matches_transformers",
               "tests/models/test_oracle.py::test_exported_graphs_match_model_oracle"]},
    "conv_bias": {
        "file": "mambadeploy/models/ref_ops.py",
        "old": "out = F.conv1d(full[:, :, 1:], weight.float().unsqueeze(1), None if bias is None else bias.float(), groups=dim)",
        "new": "out = F.conv1d(full[:, :, 1:], weight.float().unsqueeze(1), None, groups=dim)",
        "op": ["tests/kernels/test_kernel_causal_conv1d.py::test_causal_conv1d_matches_ref",
            "tests/export/test_portable_ops.py::test_causal_conv1d",
            "tests/plugins/test_ort_custom_ops.py::test_causal_conv1d_cpu"],
        "model": ["tests/models/test_hf_parity.py::test_logits_match_transformers",
               "tests/models/test_oracle.py::test_model_oracle_matches_left_padded_batch"]},
    "stale_ort_state": {
        "file": "mambadeploy/runtime/ort_runner.py",
        "old": "OrtState(dict(zip(self.state_names, outs[1:])), state.batch, state.tokens + 1, self.id))",
        "new": "OrtState(dict(state.values), state.batch, state.tokens + 1, self.id))",
        "op": [],  # not an op: the runner's state hand-over (runner-level tests below)
        "model": ["tests/models/test_oracle.py::test_exported_graphs_match_model_oracle",
               "tests/runtime/test_ort_runner.py::test_prefill_and_128_decode_steps_match_torch"]},
    "tanh_gelu": {
        "file": "mambadeploy/models/ref_ops.py",
        "old": "return F.gelu(x)  # exact erf GELU, as BlackMamba's released code computes",
        "new": "return F.gelu(x, approximate='tanh')",
        "op": ["tests/kernels/test_kernel_moe.py::test_expert_gather_matches_ref",
            "tests/export/test_portable_ops.py::test_expert_gather",
            "tests/plugins/test_ort_custom_ops.py::test_expert_gather_cpu",
            "tests/models/test_oracle.py::test_moe_oracle_matches_static_gather"],
        # the model-level checks that hold the reference against an independent GELU (the oracle's, the Triton and
        # ORT C++ kernels'); only BlackMamba's experts are GELU-gated, so the others pass by design
        "model": ["tests/models/test_oracle.py::test_model_oracle_matches_left_padded_batch",
               "tests/runtime/test_torch_fast.py::test_prefill_and_step_logits_and_state_match",
               f"{ORT_RUNNER}[blackmamba-tiny-custom]", f"{ORT_RUNNER}[blackmamba-tiny-portable]"]},
}
# keep the runs within minutes on a 2-core machine: the fp32 cases (the bounds this audit is about), and the ORT runner
# on one preset and op set
SELECT = "float32 or not (float16 or bfloat16)"
NARROW = {"tests/runtime/test_ort_runner.py::test_prefill_and_128_decode_steps_match_torch": "jamba-tiny and portable"}


def copy_tree(dest: Path) -> None:
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dest / name)


# a failed model-level check's message (tolerances._assert_model_close): the error and the bound it broke
EXCEEDS = re.compile(r"max error ([0-9.e+-]+) of the scale exceeds ([0-9.e+-]+)")


def run_tests(tree: Path, tests: list[str], tag: str, margins: dict | None = None) -> dict:
    """Run `tests` in `tree`: {test id: "passed" | "failed" | "skipped"}. margins (if given) gets, per test failed by a
    logits / state bound, {"error", "bound", "ratio"} of the first comparison that broke it."""
    report = tree / f"junit-{tag}.xml"
    results: dict = {}
    for spec in tests:  # one pytest per spec: -k narrowing differs per spec
        k = NARROW.get(spec, SELECT)
        env = dict(os.environ, PYTHONPATH=str(tree), MAMBADEPLOY_CACHE=str(tree / ".cache"))
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", "-k", k,
                        f"--junitxml={report}", spec], cwd=tree, env=env, capture_output=True, text=True, check=False)
        for case in ET.parse(report).getroot().iter("testcase"):
            failure = case.find("failure")
            outcome = "failed" if failure is not None or case.find("error") is not None else \
                "skipped" if case.find("skipped") is not None else "passed"
            test_id = f"{case.get('classname')}::{case.get('name')}"
            results[test_id] = outcome
            found = EXCEEDS.search(failure.get("message", "") + (failure.text or "")) if failure is not None else None
            if margins is not None and found:
                err, bound = float(found.group(1)), float(found.group(2))
                margins[test_id] = {"error": err, "bound": bound, "ratio": round(err / bound, 1)}
    return results


def audit(name: str, m: dict, work: Path, clean: dict | None) -> dict:
    tree = work / name
    copy_tree(tree)
    path = tree / m["file"]
    text = path.read_text()
    if text.count(m["old"]) != 1:
        raise SystemExit(f"{name}: the text to mutate occurs {text.count(m['old'])} times in {m['file']}")
    path.write_text(text.replace(m["old"], m["new"]))
    start = time.perf_counter()
    row = {"file": m["file"], "old": m["old"], "new": m["new"]}
    for level in ("op", "model"):
        margins: dict = {}
        results = run_tests(tree, m[level], f"{name}-{level}", margins)
        failed = sorted(t for t, r in results.items() if r == "failed")
        spurious = [t for t in failed if clean is not None and clean.get(t) == "failed"]
        row[level] = {"tests_run": len(results), "failed": len(failed), "failed_tests": failed,
                      "failing_files": sorted({t.split("::")[0] for t in failed}), "failing_clean_too": spurious,
                      "bound_margins": margins}
    row["seconds"] = round(time.perf_counter() - start, 1)
    row["caught_at_op_level"] = row["op"]["failed"] > 0
    row["caught_by_tests"] = row["op"]["failed"] + row["model"]["failed"]
    row["caught_by_files"] = len(set(row["op"]["failing_files"]) | set(row["model"]["failing_files"]))
    shutil.rmtree(tree, ignore_errors=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/mutation_audit_cpu.json"))
    parser.add_argument("--only", action="append", choices=list(MUTATIONS), help="audit only these (repeatable)")
    parser.add_argument("--skip-clean", action="store_true", help="do not run the tests on the clean tree first")
    parser.add_argument("--keep", action="store_true", help="with --only: keep the other mutations' rows in --out")
    args = parser.parse_args(argv)
    names = args.only or list(MUTATIONS)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="mutation-audit-") as tmp:
        work = Path(tmp)
        clean = None
        if not args.skip_clean:
            tree = work / "clean"
            copy_tree(tree)
            tests = sorted({t for n in names for level in ("op", "model") for t in MUTATIONS[n][level]})
            clean = run_tests(tree, tests, "clean")
            bad = sorted(t for t, r in clean.items() if r == "failed")
            print(f"clean tree: {len(clean)} tests, {len(bad)} failing{': ' + ', '.join(bad) if bad else ''}")
        rows = {}
        for name in names:
            rows[name] = audit(name, MUTATIONS[name], work, clean)
            r = rows[name]
            print(f"{name:16s} op-level {r['op']['failed']}/{r['op']['tests_run']} failed, model-level "
                  f"{r['model']['failed']}/{r['model']['tests_run']}, {r['caught_by_files']} test files "
                  f"({r['seconds']} s)")
    out = Path(args.out)
    if args.keep and out.exists():  # the rows of mutations not rerun stay as measured (each keeps its own commit)
        old = json.loads(out.read_text())
        rows = {**{n: {"commit": old["commit"], **r} if "commit" not in r else r
                   for n, r in old["mutations"].items() if n not in rows}, **rows}
    rows = {n: rows[n] for n in MUTATIONS if n in rows}
    for name in names:
        rows[name]["commit"] = commit
    result = {"commit": commit, "selection": SELECT, "narrowed": NARROW,
              "clean_failures": sorted(t for t, r in (clean or {}).items() if r == "failed"), "mutations": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    missed = [n for n, r in rows.items() if r["caught_by_tests"] < 2 or
              (MUTATIONS[n]["op"] and not r["caught_at_op_level"])]
    print(f"wrote {args.out}" + (f"; NOT caught as required: {', '.join(missed)}" if missed else "; every bug caught"))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
