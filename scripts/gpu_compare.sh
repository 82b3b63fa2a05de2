#!/usr/bin/env bash
# The reference comparison on the full data, sized for one call on one GPU per
# part: Fashion-MNIST's 60,000 training images, ResNet-18, seed 0, the
# device-resident pipeline (the data set, crop and flip, and the swap on the
# GPU), bf16 autocast, channels_last. Needs python3 with a CUDA torch, numpy,
# tqdm and matplotlib (no venv, no network), and Fashion-MNIST's four .gz
# files in $FASHION_MNIST_DIR (default .data/fashion-mnist, git-ignored;
# `make gpu-data` copies them there from /usr/share/datasets/fashion-mnist).
#
#   make gpu-compare              # part 1: CE / CS-KD / IPS, EPOCHS epochs (default 25: ~7.3 min
#                                 # on one H200, measured)
#   PART=2 make gpu-compare       # part 2: CutMix and IPS with alpha 0.5 at the same epochs, then one
#                                 # short epoch of IPS through torchrun (nccl, one process)
#   METHODS="ce cskd ips cutmix" EPOCHS=2 make gpu-compare   # timing with CutMix too
#   EPOCHS=2 make gpu-compare     # timing: s/epoch and s/evaluation of each method, and the
#                                 # epoch count that fits BUDGET_S seconds (default 480)
#
# Files go to $REPORT_DIR (default runs/gpu-compare): build.log (when it
# builds), train.log, metrics.json, curves.png, swaps-seed0.png; part 2 puts
# each call's in cutmix/, ips-alpha0.5/ and torchrun/ there. Each part ends
# with the cost table (python -m ipsd_cuda.reference.cost) of what
# $REPORT_DIR holds: accuracy, step time and the swap's share of a step.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DIR=${REPORT_DIR:-runs/gpu-compare}
DATA=${FASHION_MNIST_DIR:-.data/fashion-mnist}
EPOCHS=${EPOCHS:-25}
PART=${PART:-1}
case $PART in 1 | 2) ;; *) echo "PART must be 1 or 2, got '$PART'" >&2; exit 2 ;; esac
mkdir -p "$DIR"
export PYTHONUNBUFFERED=1
# The system compiler, for the reason given in gpu_check.sh.
export CC=${IPSD_CC:-gcc} CXX=${IPSD_CXX:-g++}

if [ ! -f "$DATA/train-images-idx3-ubyte.gz" ]; then
  echo "Fashion-MNIST is not in $DATA: run 'make gpu-data' where /usr/share/datasets/fashion-mnist exists" \
    "and bring .data/ along with the checkout" >&2
  exit 1
fi
start=$(date +%s)
if ! $PY -c "import sys, ipsd_cuda; sys.exit(not ipsd_cuda.backends()['cuda'])" 2>/dev/null; then
  echo "building the extension (log: $DIR/build.log)"
  IPSD_REQUIRE_EXTENSION=1 MAX_JOBS=8 $PY -m pip install -v --no-build-isolation --no-deps -e . \
    >"$DIR/build.log" 2>&1 || { tail -n 30 "$DIR/build.log"; exit 1; }
fi
build_s=$(($(date +%s) - start))
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# train OUT ARGS...: one ipsd-train call on the full data with the settings above.
train() {
  local out=$1
  shift
  mkdir -p "$out"
  # shellcheck disable=SC2086
  $PY -m ipsd_cuda.reference.train --data fashion-mnist --data-dir "$DATA" --seeds 0 \
    --model resnet18 --pipeline resident --amp --channels-last --epochs "$EPOCHS" \
    --eval-every $((EPOCHS >= 5 ? EPOCHS / 5 : 1)) --quiet --out "$out" "$@" ${GPU_COMPARE_ARGS:-} 2>&1 |
    tee "$out/train.log"
}
torchrun_rc=0
if [ "$PART" = 2 ]; then
  train "$DIR/cutmix" --method cutmix
  train "$DIR/ips-alpha0.5" --method ips --alpha 0.5
  # One process, the loader pipeline, one epoch: this shows that the nccl
  # path starts, trains and finishes, not that it scales. Its failure still
  # leaves the cost table of the runs above, then fails the call.
  # shellcheck disable=SC2086
  $PY -m torch.distributed.run --standalone --nproc_per_node=1 -m ipsd_cuda.reference.train \
    --device cuda --data fashion-mnist --data-dir "$DATA" --method ips --seeds 0 --model resnet18 \
    --amp --channels-last --epochs 1 --quiet --no-swap-examples --out "$DIR/torchrun" ${GPU_COMPARE_ARGS:-} 2>&1 |
    tee "$DIR/torchrun.log" || torchrun_rc=$?
else
  # The three methods the epoch budget was timed with (METHODS="ce cskd ips cutmix" adds CutMix).
  # shellcheck disable=SC2086
  train "$DIR" --method ${METHODS:-ce cskd ips}
fi
echo "build ${build_s} s, whole call $(($(date +%s) - start)) s"
if [ "$PART" = 1 ]; then
  $PY scripts/epochs_for_budget.py "$DIR/metrics.json" --build-s "$build_s" --budget-s "${BUDGET_S:-480}"
fi
# Every comparison run in $DIR (part 1's too, where its folder came along).
mapfile -t runs < <(find "$DIR" -name metrics.json -not -path "*/torchrun/*" | sort)
$PY -m ipsd_cuda.reference.cost "${runs[@]}"
exit "$torchrun_rc"
