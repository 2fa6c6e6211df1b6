#!/bin/bash
# One device call (see benchmarks/README.md): GPU parity tests at full shapes, then the benchmarks.
# Usage: bash benchmarks/run_gpu.sh [tests] [tests-quick] [tests-runtime] [kernels] [sweep] [sweep-scan] [decode] [prefill] [decode-quick] [prefill-quick]
#        (default: tests kernels decode prefill)
# Logs and JSON land in $OUT (the device runner) or /tmp/mambadeploy-bench.
set -o pipefail  # a failing test fails the stage although its output is piped into tee | tail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/benchmarks
OUT=${OUT:-/tmp/mambadeploy-bench}; mkdir -p "$OUT"
stages=${*:-tests kernels decode prefill}
nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for stage in $stages; do
  echo "=== $stage $(date +%T)"
  case $stage in
    tests) timeout 480 python3 -m pytest -q -rfE -p no:cacheprovider tests/kernels tests/runtime/test_torch_fast.py \
             2>&1 | tee "$OUT/tests.log" | tail -40 || fail=1 ;;
    tests-quick) timeout 300 python3 -m pytest -q -rfE -p no:cacheprovider tests/kernels/test_kernel_state_update.py \
             tests/kernels/test_kernel_moe.py tests/runtime/test_torch_fast.py 2>&1 | tee "$OUT/tests.log" | tail -25 || fail=1 ;;
    tests-runtime) timeout 240 python3 -m pytest -q -rfE -p no:cacheprovider tests/runtime/test_torch_fast.py \
             tests/kernels/test_kernel_selective_scan.py 2>&1 | tee "$OUT/tests.log" | tail -15 || fail=1 ;;
    sweep-scan) timeout 300 python3 benchmarks/sweep_kernels.py --only scan 2>&1 | tee "$OUT/sweep.log" | tail -70 ;;
    sweep) timeout 300 python3 benchmarks/sweep_kernels.py 2>&1 | tee "$OUT/sweep.log" | tail -45 ;;
    kernels) timeout 200 python3 benchmarks/bench_kernels.py 2>&1 | tee "$OUT/kernels.log" | tail -30 ;;
    decode) timeout 330 python3 benchmarks/bench_decode.py 2>&1 | tee "$OUT/decode.log" | tail -12 ;;
    decode-quick) timeout 240 python3 benchmarks/bench_decode.py --presets blackmamba-2.8b --batches 1 64 \
                    --name decode_quick --profile 2>&1 | tee "$OUT/decode_quick.log" | tail -50 ;;
    prefill-quick) timeout 200 python3 benchmarks/bench_prefill.py --presets blackmamba-2.8b --lengths 2048 \
                     2>&1 | tee "$OUT/prefill_quick.log" | tail -8 ;;
    prefill) timeout 330 python3 benchmarks/bench_prefill.py 2>&1 | tee "$OUT/prefill.log" | tail -12 ;;
  esac
done
echo "=== done $(date +%T)"
exit ${fail:-0}  # a failed test stage fails the script (the benchmarks after it still ran)
