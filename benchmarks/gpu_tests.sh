#!/bin/bash
# Every GPU-marked test in one run on the device machine; exits non-zero when any test fails or errors (pipefail: the
# pytest status survives the tee). The log goes to $OUT/gpu_tests_<gpu>.log with a header: GPU, commit, versions, and
# the pytest summary line (counts). Copy it to benchmarks/results/ whenever GPU code changes.
#   bash benchmarks/gpu_tests.sh [extra pytest args]      (ORT-CUDA tests need onnxruntime-gpu: stage it into /tmp/site
#                                                          first, benchmarks/engines_gpu.sh first/stage/tests)
# The commit comes from the COMMIT file the caller writes, else from git (`git rev-parse HEAD >
# COMMIT` before the call: the device gets the working tree, not always its .git).
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD:$PWD/tests/plugins:${PYTHONPATH:-}
OUT=${OUT:-/tmp/gpu-tests}; mkdir -p "$OUT"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
[ -n "$gpu" ] || { echo "no GPU (nvidia-smi found none): these tests need the device machine" >&2; exit 2; }
log="$OUT/gpu_tests_$(echo "$gpu" | tr 'A-Z ' 'a-z_' | tr -cd 'a-z0-9_').log"
commit=$(cat COMMIT 2>/dev/null || git rev-parse HEAD 2>/dev/null || echo unknown)  # COMMIT first: a stale .git may travel
{
  echo "# GPU tests: $gpu"
  echo "# commit: $commit   date: $(date -u +%FT%TZ)"
  python3 -c "import torch, triton; print('# torch', torch.__version__, 'triton', triton.__version__)"
  python3 -c "import onnxruntime as o; print('# onnxruntime', o.__version__, o.get_available_providers())" 2>/dev/null \
    || echo "# onnxruntime: not importable (ORT-CUDA tests will skip)"
} > "$log"
timeout 580 python3 -m pytest -q -rfEs -m gpu -p no:cacheprovider tests "$@" 2>&1 | tee -a "$log" | tail -30
rc=$?
echo "# pytest exit status: $rc" >> "$log"
exit $rc
