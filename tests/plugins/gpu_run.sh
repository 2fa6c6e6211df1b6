#!/bin/bash
# The plugins' GPU run on the device machine, spread over the calls that carry onnxruntime-gpu in parts
# (.device-wheels/partN, made by ../shared/device/stage-wheels.sh .device-wheels onnxruntime-gpu==1.31.1):
#   bash tests/plugins/gpu_run.sh first      call 1 (carry .device-wheels/part1 .device-build): exports for the ORT bench
#                                            start in the background (setsid: they outlive the call), part 1 staged,
#                                            then the AOT PTX tests (tests/plugins/test_aot_gpu.py) in the foreground
#   bash tests/plugins/gpu_run.sh stage N    calls 2..5 (carry .device-wheels/partN): stage part N
#   bash tests/plugins/gpu_run.sh last N     last call (carry .device-wheels/partN .device-build): stage, install into
#                                            /tmp/site (skipped when it already holds onnxruntime-gpu), ORT CUDA op
#                                            tests, then benchmarks/bench_ort_custom.py on the exports
# .device-build/cache holds the ORT headers and the prebuilt libraries (MAMBADEPLOY_CACHE), so nothing is fetched.
# Everything worth keeping lands in $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/tests/plugins MAMBADEPLOY_CACHE=$PWD/.device-build/cache
OUT=${OUT:-/tmp/plugins-gpu}; mkdir -p "$OUT" /tmp/stage
EXPORTS=/tmp/plugins-exports
step=$1; part=$2
has_ort_gpu() { PYTHONPATH=/tmp/site python3 -c "import onnxruntime as o, sys; o.preload_dlls(); \
sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; }

case $step in
  first)
    nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    if [ ! -f $EXPORTS/DONE ]; then
      setsid nohup python3 benchmarks/bench_ort_custom.py --export-only $EXPORTS --dtypes fp32 fp16 \
        > /tmp/plugins-export.log 2>&1 < /dev/null &
    fi
    cp .device-wheels/part1/* /tmp/stage/ 2>/dev/null
    MAMBADEPLOY_RESULTS_DIR=$OUT timeout 400 python3 -m pytest -q -rfE -p no:cacheprovider tests/plugins/test_aot_gpu.py \
      2>&1 | tee "$OUT/aot_gpu.log" | tail -25
    echo "--- export log so far"; tail -5 /tmp/plugins-export.log
    has_ort_gpu && echo "onnxruntime-gpu already in /tmp/site" ;;
  stage)
    cp .device-wheels/part$part/* /tmp/stage/ && ls /tmp/stage | tr '\n' ' '; echo
    tail -2 /tmp/plugins-export.log ;;
  last)
    [ -n "$part" ] && cp .device-wheels/part$part/* /tmp/stage/ 2>/dev/null
    has_ort_gpu || bash /tmp/stage/install.sh || { echo "install failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PYTHONPATH
    MAMBADEPLOY_RESULTS_DIR=$OUT timeout 150 python3 -m pytest -q -rfE -p no:cacheprovider tests/plugins/test_ort_cuda_ops.py \
      2>&1 | tee "$OUT/ort_cuda_ops.log" | tail -25
    for i in $(seq 60); do [ -f $EXPORTS/DONE ] && break; sleep 2; done
    echo "--- exports"; cat /tmp/plugins-export.log | grep -v -i warn | tail -8
    timeout 280 python3 benchmarks/bench_ort_custom.py --exports $EXPORTS --dtypes fp32 fp16 --out "$OUT" --budget 200 \
      2>&1 | grep -v -i warn | tee "$OUT/bench_ort_custom.log" | tail -20 ;;
esac
