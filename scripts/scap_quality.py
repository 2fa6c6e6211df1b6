"""SCAP quality on the trained testbed (CPU): held-out perplexity per family at target sparsity 0 / 0.3 / 0.5 / 0.7,
mode=zero (the CATS-like baseline) beside mode-centering (mode=auto: 0, median or KDE peak per site, least output
error), and the sparsity actually realised on held-out text. Writes JSON + an SVG plot (perplexity vs sparsity).

    PYTHONPATH=$PWD python scripts/scap_quality.py --out benchmarks/results/scap_quality_cpu.json

Calibration: 64 windows of 256 bytes from the training split (the paper's 64 x 256); evaluation: 32 windows of 256
bytes from the held-out split (models/trained.corpus_split). Deterministic.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mambadeploy.models.calibrate import calibrate, realised_sparsity, windows_from_tokens
from mambadeploy.models.checkpoint import load_model
from mambadeploy.models.trained import TRAINED_CONFIGS, corpus_split
from mambadeploy.validate.svg import line_chart

TARGETS = (0.0, 0.3, 0.5, 0.7)
MODES = ("zero", "auto")


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch: int = 8) -> float:
    total, count = 0.0, 0
    for start in range(0, len(windows), batch):
        w = windows[start:start + batch]
        logits, _ = model(w[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum").item()
        count += w[:, 1:].numel()
    return math.exp(total / count)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON path; the plot is written beside it (.svg)")
    parser.add_argument("--models", default=",".join(TRAINED_CONFIGS))
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    train, held, digest = corpus_split(Path(sysconfig.get_paths()["stdlib"]))
    calib = windows_from_tokens(train.long(), args.samples, args.seq_len)
    evaluation = windows_from_tokens(held.long(), args.eval_windows, args.seq_len + 1)
    rows = []
    for name in args.models.split(","):
        dense = load_model(name)
        dense_ppl = perplexity(dense, evaluation)
        print(f"{name}: dense held-out perplexity {dense_ppl:.4f}", flush=True)
        for mode in MODES:
            for target in TARGETS:
                t0 = time.time()
                sparse = calibrate(dense, calib, target, mode=mode)
                ppl = perplexity(sparse, evaluation)
                realised = realised_sparsity(sparse, evaluation[:, :-1])["all"]
                kinds = {}
                for s in sparse.config.sparsity["sites"].values():
                    kinds[s["mode_kind"]] = kinds.get(s["mode_kind"], 0) + 1
                row = {"model": name, "mode": mode, "target": target, "heldout_ppl": ppl, "dense_ppl": dense_ppl,
                       "ppl_increase_pct": 100 * (ppl / dense_ppl - 1), "realised_sparsity": realised,
                       "realised_minus_target": realised - target, "sites": len(sparse.config.sparsity["sites"]),
                       "mode_kinds": kinds, "seconds": round(time.time() - t0, 1)}
                if target == 0.0:
                    row["bit_identical_to_dense"] = bool(torch.equal(sparse(evaluation[:2, :64])[0],
                                                                     dense(evaluation[:2, :64])[0]))
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {"schema": "mambadeploy.scap_quality/1", "created": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                          "torch": torch.__version__},
              "corpus": {"what": "CPython stdlib top-level *.py, byte-level; every 10th file held out",
                         "sha256": digest, "calibration_windows": list(calib.shape),
                         "eval_windows": list(evaluation.shape)},
              "targets": list(TARGETS), "modes": {"zero": "CATS-like: threshold on |x|",
                                                  "auto": "SCAP mode-centering: 0 / median / KDE peak per site"},
              "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    series = {f"{r['model'].replace('-small-trained', '')} {r['mode']}": [] for r in rows}
    for r in rows:
        series[f"{r['model'].replace('-small-trained', '')} {r['mode']}"].append((r["target"], r["heldout_ppl"]))
    out.with_suffix(".svg").write_text(line_chart(series, "SCAP: held-out perplexity vs target sparsity (CPU)",
                                                  "target sparsity", "perplexity (bytes)", log_y=False))
    print(f"wrote {out} and {out.with_suffix('.svg')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
