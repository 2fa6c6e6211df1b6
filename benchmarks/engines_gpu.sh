#!/bin/bash
# The engines run on the device machine (benchmarks/bench_engines.py), over the calls that carry onnxruntime-gpu in
# parts (.device-wheels/partN from ../shared/device/stage-wheels.sh .device-wheels onnxruntime-gpu==1.31.1), each call
# within 30 s of the last (the machine keeps /tmp while warm):
#   bash benchmarks/engines_gpu.sh first        carry .device-wheels/part1 .device-build: the exports start in the
#                                               background (setsid: they outlive the call), part 1 staged
#   bash benchmarks/engines_gpu.sh stage N      carry .device-wheels/partN
#   bash benchmarks/engines_gpu.sh tests N [pytest args]  carry .device-wheels/partN .device-build: install, then the
#                                               ORT CUDA op tests and the ORT runner's GPU tests, or the pytest
#                                               arguments given (log in $OUT)
#   bash benchmarks/engines_gpu.sh bench M...   the benchmark parts/models named (bench_engines.py arguments)
# .device-build/cache holds the ORT headers and the prebuilt CUDA library (MAMBADEPLOY_CACHE): nothing is fetched.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD:$PWD/tests/plugins MAMBADEPLOY_CACHE=$PWD/.device-build/cache
OUT=${OUT:-/tmp/engines-out}; mkdir -p "$OUT" /tmp/stage
WORK=/tmp/engines
step=$1; shift
case $step in
  first)
    nvidia-smi -L; df -h /tmp | tail -1
    setsid nohup bash -c "python3 benchmarks/bench_engines.py --export-only --work $WORK \
        --models blackmamba-1.5b blackmamba-2.8b --dtypes fp16 bf16 && \
      python3 benchmarks/bench_engines.py --export-only --work $WORK --models jamba-1.5-mini:8 --dtypes bf16" \
      > /tmp/engines-export.log 2>&1 < /dev/null &
    cp .device-wheels/part1/* /tmp/stage/ ;;
  stage)
    cp .device-wheels/part$1/* /tmp/stage/ && ls /tmp/stage | tr '\n' ' '; echo; tail -2 /tmp/engines-export.log ;;
  tests)
    [ -n "$1" ] && cp .device-wheels/part$1/* /tmp/stage/
    [ -d /tmp/site/onnxruntime ] || bash /tmp/stage/install.sh || { echo "install failed"; exit 1; }
    shift; [ $# -gt 0 ] || set -- tests/plugins/test_ort_cuda_ops.py tests/runtime/test_ort_runner.py
    timeout 540 python3 -m pytest -q -rfE -p no:cacheprovider "$@" 2>&1 | tee "$OUT/gpu_tests.log" | tail -30
    echo "--- exports"; grep -v -i warn /tmp/engines-export.log | grep -i "exported\|error" | tail -8 ;;
  bench)
    timeout 560 python3 benchmarks/bench_engines.py --work $WORK --out "$OUT/bench_engines.json" "$@" 2>&1 \
      | grep -v -i warn | tee "$OUT/bench_engines.log" | tail -40
    echo "--- exports"; grep -v -i warn /tmp/engines-export.log | grep -i "exported\|error" | tail -8 ;;
esac
