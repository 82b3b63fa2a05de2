#!/usr/bin/env bash
# Nsight Compute over the swap's kernels, for a machine with a CUDA GPU: the
# workload of scripts/profile_swap.py (one launch of every kernel per input,
# after warm-up), with the sections that say what bounds a kernel (speed of
# light, launch, occupancy, memory, scheduler and warp states). Clocks are
# left as they are (--clock-control none). Writes to $REPORT_DIR (default
# runs/gpu-profile): swap.ncu-rep (open it in Nsight Compute), details.txt
# (every section, per kernel, named after the NVTX range of its call) and
# summary.txt (one line per kernel in launch order: time, grid, registers,
# SM and DRAM throughput, then the calls in order: a swap is several
# launches); prints the summary. Needs the extension built (make gpu-check
# builds it).
#
#   bash scripts/gpu_profile.sh
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${REPORT_DIR:-runs/gpu-profile}
PY=${PYTHON:-python3}
mkdir -p "$DIR"
NCU=$(command -v ncu || echo "${CUDA_HOME:-/usr/local/cuda}/bin/ncu")
if [ ! -x "$NCU" ]; then
  echo "gpu_profile: no ncu on PATH or in CUDA_HOME" | tee "$DIR/summary.txt"
  exit 1
fi
timeout -k 10 180 "$NCU" --clock-control none --profile-from-start off --nvtx \
  --section SpeedOfLight --section LaunchStats --section Occupancy \
  --section MemoryWorkloadAnalysis --section SchedulerStats --section WarpStateStats \
  --export "$DIR/swap" --force-overwrite \
  $PY scripts/profile_swap.py >"$DIR/ncu.log" 2>&1
rc=$?
tail -n 5 "$DIR/ncu.log"
if [ $rc -ne 0 ] || [ ! -f "$DIR/swap.ncu-rep" ]; then
  echo "gpu_profile: ncu failed (rc=$rc), see $DIR/ncu.log" | tee "$DIR/summary.txt"
  exit 1
fi
"$NCU" --import "$DIR/swap.ncu-rep" --print-nvtx-rename kernel --page details >"$DIR/details.txt" 2>&1
"$NCU" --import "$DIR/swap.ncu-rep" --print-nvtx-rename kernel --page raw --csv --print-units base \
  --metrics gpu__time_duration.sum,launch__grid_size,launch__block_size,launch__registers_per_thread,sm__throughput.avg.pct_of_peak_sustained_elapsed,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active \
  >"$DIR/raw.csv" 2>&1
$PY - "$DIR/raw.csv" "$DIR/ncu.log" <<'PY' | tee "$DIR/summary.txt"
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r.get("ID", "").isdigit()]
calls = [l[len("call: "):].strip() for l in open(sys.argv[2]) if l.startswith("call: ")]
cols = ["gpu__time_duration.sum", "launch__grid_size", "launch__block_size", "launch__registers_per_thread",
        "sm__throughput.avg.pct_of_peak_sustained_elapsed", "dram__throughput.avg.pct_of_peak_sustained_elapsed",
        "sm__warps_active.avg.pct_of_peak_sustained_active"]
print("| id | kernel | time (µs) | grid | block | regs | SM % | DRAM % | warps active % |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    v = [r.get(c, "") for c in cols]
    try:
        v[0] = f"{float(v[0]) / 1e3:.1f}"
    except ValueError:
        pass
    print(f"| {r['ID']} | {r['Kernel Name'][:60]} | " + " | ".join(v) + " |")
print(f"\n{len(rows)} kernels profiled; the calls, in order:")
print("\n".join(calls))
PY
