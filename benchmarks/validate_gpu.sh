#!/bin/bash
# `mambadeploy validate` on the GPU machine (one device call; see benchmarks/README.md for the wheel staging that
# ort-cuda needs first). Usage: bash benchmarks/validate_gpu.sh [export|smoke|full]...  (default: smoke full; `export full` after the wheels)
#   export  fill the export cache with the blackmamba-1.5b fp32 + fp16 exports (so `full` only runs)
#   smoke   blackmamba-tiny across the GPU backends (seconds; catches a broken path before the big run)
#   full    blackmamba-1.5b across every backend that runs there (ort-cpu last, skipped past --time-limit): the JSON +
#           HTML committed under benchmarks/results/
# Results land in $OUT (the device runner) or /tmp/mambadeploy-validate.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export MAMBADEPLOY_CACHE=${MAMBADEPLOY_CACHE:-/tmp/mambadeploy-cache}
OUT=${OUT:-/tmp/mambadeploy-validate}; mkdir -p "$OUT"
BACKENDS=torch,torch:bf16,torch-fast,torch-fast:bf16,ort-cuda,ort-cuda:fp16
nvidia-smi -L
python3 -c "import torch, onnxruntime as ort; getattr(ort, 'preload_dlls', lambda: None)(); \
print('torch', torch.__version__, '| onnxruntime', ort.__version__, ort.get_available_providers())"
for stage in ${*:-smoke full}; do
  echo "=== $stage $(date +%T)"
  case $stage in
    export) timeout 400 python3 -c "
import time
from mambadeploy.runtime.ort_runner import export_for
for dt in ('fp32', 'fp16'):
    t = time.perf_counter(); d = export_for('blackmamba-1.5b', dt); print(dt, d, f'{time.perf_counter() - t:.1f} s')
" 2>&1 | tee "$OUT/export.log" | tail -5 ;;
    smoke) timeout 150 python3 -m mambadeploy.cli validate blackmamba-tiny --backends $BACKENDS,ort-cpu \
             --new-tokens 16 --per-layer --json "$OUT/validate_smoke.json" 2>&1 | tee "$OUT/smoke.log" | tail -45 ;;
    full) timeout 450 python3 -m mambadeploy.cli validate blackmamba-1.5b --backends $BACKENDS,ort-cpu \
            --num-prompts 4 --prompt-len 64 --new-tokens 64 --per-layer --time-limit 240 \
            --json "$OUT/validate_blackmamba-1.5b_h100.json" --report "$OUT/validate_blackmamba-1.5b_h100.html" \
            2>&1 | tee "$OUT/full.log" | tail -45 ;;
  esac
done
echo "=== done $(date +%T)"
