#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU and no network: builds the
# extension for the visible GPU, runs the small swaps of
# scripts/sanitize_swap.py (a smoke run: if they hang, it stops there), the
# whole test suite (CUDA cases included), compute-sanitizer memcheck and
# initcheck on the small swaps, the CUDA benchmarks and the per-call
# timings of bench/cuda_timing.py. Every step has a time limit. At most
# 7 files go to $REPORT_DIR (default runs/gpu-check): build.log, tests.log,
# sanitizer.log, bench.log, bench-cuda.json, bench-cuda.png, report.txt. The
# report is printed last. The reference comparison on the GPU is a separate
# call: make gpu-compare.
#
#   make gpu-check
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${REPORT_DIR:-runs/gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$DIR"
REPORT="$DIR/report.txt"
: >"$REPORT"
export PYTHONUNBUFFERED=1

# step NAME LOG COMMAND...: run COMMAND, appending its output to LOG, and
# add one line (status, seconds, last line of output) to the report.
step() {
  local name=$1 log=$2 start rc
  shift 2
  start=$(date +%s)
  echo "=== $name: $*" >>"$log"
  "$@" >>"$log" 2>&1
  rc=$?
  printf '%-10s rc=%-3d %5ds   %s\n' "$name" "$rc" "$(($(date +%s) - start))" "$(tail -n 1 "$log")" | tee -a "$REPORT"
  return $rc
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee -a "$REPORT"

# The system compiler, whose C++ runtime is the one torch loads. On one GPU
# image CC/CXX named a separate toolchain (/opt/gcc), and the module it built
# crashed (SIGSEGV) on its first C++ exception, an argument check.
export CC=${IPSD_CC:-gcc} CXX=${IPSD_CXX:-g++}
echo "compilers: $("$CXX" --version | head -n 1); nvcc $(nvcc --version | grep -o 'release [0-9.]*')" | tee -a "$REPORT"
step build "$DIR/build.log" env IPSD_REQUIRE_EXTENSION=1 MAX_JOBS=8 \
  timeout -k 10 300 $PY -m pip install -v --no-build-isolation --no-deps -e . || exit 1
$PY -c "import ipsd_cuda; print('kernels', ipsd_cuda.backends())" 2>&1 | tee -a "$REPORT"
echo "links: $(readelf -d ipsd_cuda/_C*.so | grep -o 'NEEDED.*' | grep -oE '\[[^]]*\]' | tr -d '[]' | tr '\n' ' ')" | tee -a "$REPORT"
# Every kernel path on small inputs first, in seconds: a kernel that hangs
# shows here, and the steps after it, minutes of device time, are skipped.
step smoke "$DIR/sanitizer.log" timeout -k 10 60 $PY scripts/sanitize_swap.py
rc=$?
if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
  echo "smoke timed out: a kernel hangs on the small cases of scripts/sanitize_swap.py; nothing else ran" |
    tee -a "$REPORT"
  exit 1
fi
# With pytest-xdist (on the GPU image), tests run in parallel workers, and a
# test that crashes its worker is reported as failed instead of ending the run.
PARALLEL=()
$PY -c "import xdist" 2>/dev/null && PARALLEL=(-n 8)
step tests "$DIR/tests.log" env IPSD_EXPECT_KERNELS=cpu,cuda HYPOTHESIS_PROFILE=ci \
  timeout -k 10 240 $PY -m pytest -q -p no:cacheprovider -rfEs --tb=short ${PARALLEL[@]+"${PARALLEL[@]}"}
SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
if [ -x "$SANITIZER" ]; then
  for tool in memcheck initcheck; do
    step "$tool" "$DIR/sanitizer.log" timeout -k 10 120 "$SANITIZER" --tool "$tool" --error-exitcode 9 $PY scripts/sanitize_swap.py
  done
else
  echo "sanitizer  FAILED: no compute-sanitizer on PATH or in CUDA_HOME" | tee -a "$REPORT"
fi
step bench "$DIR/bench.log" timeout -k 10 150 $PY -m pytest bench -q -p no:cacheprovider -m cuda \
  --benchmark-max-time=0.2 --benchmark-min-rounds=10 --benchmark-json "$DIR/bench-cuda.json"
$PY bench/report.py "$DIR/bench-cuda.json" --png "$DIR/bench-cuda.png" >>"$REPORT" 2>&1
# Per-call times over many calls (no sync inside), graph replay, launches.
step timing "$DIR/bench.log" timeout -k 10 90 $PY bench/cuda_timing.py
sed -n '/^| input/,$p' "$DIR/bench.log" >>"$REPORT"

echo "--- tests"
grep -E "^(FAILED|ERROR)|passed|failed|error" "$DIR/tests.log" | tail -n 30
echo "--- sanitizer"
grep -hE "ERROR SUMMARY|^(ok|FAIL) " "$DIR/sanitizer.log" 2>/dev/null
echo "--- report"
cat "$REPORT"
