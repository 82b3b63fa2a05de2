#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU and no network: builds the
# extension for the visible GPU, runs the whole test suite (CUDA cases
# included), compute-sanitizer memcheck on small swaps, and the CUDA
# benchmarks. Logs and a short report go to $OUT (default runs/gpu-check);
# the report is printed last.
#
#   make gpu-check                      # the checks (a few minutes)
#   GPU_COMPARE="--epochs 30 --seeds 0 1 2" make gpu-check   # and the reference comparison
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
: >"$OUT/report.txt"
export PYTHONUNBUFFERED=1

step() {
  local name=$1 start rc
  shift
  start=$(date +%s)
  "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  printf '%-10s rc=%-3d %5ds   %s\n' "$name" "$rc" "$(($(date +%s) - start))" "$(tail -n 1 "$OUT/$name.log")" | tee -a "$OUT/report.txt"
  return $rc
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee -a "$OUT/report.txt"

step build env IPSD_REQUIRE_EXTENSION=1 MAX_JOBS=8 $PY -m pip install -v --no-build-isolation --no-deps -e . || exit 1
$PY -c "import ipsd_cuda; print('kernels', ipsd_cuda.backends())" | tee -a "$OUT/report.txt"
step tests env IPSD_EXPECT_KERNELS=cpu,cuda HYPOTHESIS_PROFILE=ci $PY -m pytest python_tests -q -p no:cacheprovider
if command -v compute-sanitizer >/dev/null; then
  step memcheck compute-sanitizer --tool memcheck --error-exitcode 9 $PY scripts/sanitize_swap.py
  step initcheck compute-sanitizer --tool initcheck --error-exitcode 9 $PY scripts/sanitize_swap.py
else
  echo "memcheck   skipped: no compute-sanitizer" | tee -a "$OUT/report.txt"
fi
step bench $PY -m pytest bench -q -p no:cacheprovider -m cuda --benchmark-max-time=0.2 --benchmark-min-rounds=10 --benchmark-json "$OUT/bench-cuda.json"
step report $PY bench/report.py "$OUT/bench-cuda.json" --png "$OUT/bench-cuda.png"
if [ -n "${GPU_COMPARE:-}" ]; then
  # shellcheck disable=SC2086
  step compare $PY -m ipsd_cuda.train --data fashion-mnist --data-dir "${FASHION_MNIST_DIR:-.data/fashion-mnist}" \
    --method compare --model resnet18 --amp --channels-last --num-workers 8 --quiet --out "$OUT/compare" $GPU_COMPARE
fi

echo "--- tests";  grep -E "passed|failed|error" "$OUT/tests.log" | tail -n 3
echo "--- sanitizer"; grep -hE "ERROR SUMMARY|FAIL" "$OUT"/memcheck.log "$OUT"/initcheck.log 2>/dev/null
echo "--- benchmarks"; cat "$OUT/report.log" 2>/dev/null
[ -f "$OUT/compare.log" ] && { echo "--- compare"; tail -n 6 "$OUT/compare.log"; }
echo "--- summary"; cat "$OUT/report.txt"
