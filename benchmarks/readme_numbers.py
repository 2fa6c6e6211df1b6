"""The figures the READMEs quote, recomputed from the committed results JSON (so a README number can always be traced
to a file): torch-fast against eager at batch 1 on the 2.8B shape across every committed decode run (H100), and the
ORT / torch-fast ratios of the latest engines round (H200).

    python benchmarks/readme_numbers.py
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def decode_vs_eager() -> dict:
    """Every batch-1 2.8B row of results/{,archive/}decode*.json: eager ms, torch-fast wall ms, their ratio
    (wall against wall: the eager step is host-bound)."""
    rows = []
    for f in sorted(glob.glob(str(RESULTS / "**" / "decode*.json"), recursive=True)):
        for r in json.loads(Path(f).read_text()).get("rows", []):
            if r.get("batch") == 1 and "2.8b" in str(r.get("preset", "")) and r.get("eager_ms"):
                rows.append((Path(f).name, r["eager_ms"], r["fast_wall_ms"], r["eager_ms"] / r["fast_wall_ms"]))
    eager = [r[1] for r in rows]
    ratio = [r[3] for r in rows]
    return {"runs": len(rows), "eager_ms": (min(eager), max(eager)), "speedup": (min(ratio), max(ratio))}


def engines_ratios() -> dict:
    """ORT (AOT kernels) / torch-fast per shape and batch, from the newest round of results/engines_nvidia_h200.json
    that measured each shape."""
    data = json.loads((RESULTS / "engines_nvidia_h200.json").read_text())
    out = {}
    for rnd in data["rounds"].values():  # rounds in order: later ones overwrite
        for call in rnd["runs"].values():
            for shape, s in call.get("shapes", {}).items():
                runs = s["runs"]
                fast = runs.get("torch-fast:bf16", {})
                for label, run in runs.items():
                    if not label.startswith("ort-cuda-custom:") or "/" in label or "decode_ms" not in run:
                        continue
                    ratio = {f"b{b}": run["decode_ms"][b] / fast["decode_ms"][b] for b in run["decode_ms"]
                             if b in fast.get("decode_ms", {})}
                    if "2048" in run.get("prefill_ms", {}) and "2048" in fast.get("prefill_ms", {}):
                        ratio["prefill2048"] = run["prefill_ms"]["2048"] / fast["prefill_ms"]["2048"]
                    out[f"{shape} {label}"] = {k: round(v, 2) for k, v in ratio.items()}
    return out


if __name__ == "__main__":
    d = decode_vs_eager()
    print(f"2.8B batch 1, {d['runs']} committed decode rows (H100): eager {d['eager_ms'][0]:.1f}-{d['eager_ms'][1]:.1f} "
          f"ms, torch-fast {d['speedup'][0]:.1f}-{d['speedup'][1]:.1f}x faster")
    for k, v in engines_ratios().items():
        print(k, v)
