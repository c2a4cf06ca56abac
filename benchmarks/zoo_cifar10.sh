#!/usr/bin/env bash
# Every method of the zoo on the CIFAR-10 recipe: trains the three teachers the grid needs (each
# skipped when its run already finished), then runs configs/zoo-cifar10.yaml with `vitdistill
# compare` (resumable: rerun the same command after an interruption).
# Usage: bash benchmarks/zoo_cifar10.sh [OUT]   (default runs/zoo-cifar10; teachers in runs/cifar10)
#   SHARDS=2: the grid as 2 `compare --shard` processes side by side, each with nproc/2 threads
#   (on a 2-core CPU two 1-thread runs do more work per second than one 2-thread run).
set -euo pipefail
OUT=${1:-runs/zoo-cifar10}
VD=${VD:-.venv/bin/vitdistill}
CFG=configs/cifar10.yaml
T=runs/cifar10
mkdir -p "$T"
teacher() {  # name model epochs lr
  local out=$T/$1
  [ -f "$out/summary.json" ] && return 0
  local resume=""; [ -f "$out/checkpoint.pt" ] && resume="--resume"
  $VD train --config $CFG --model "$2" --epochs "$3" --lr "$4" --out "$out" --no-progress $resume
}
teacher teacher resnet_micro_cnn 10 2e-3
teacher vit-teacher vit_pico_patch4_32 10 1e-3
teacher inv-teacher rednet_micro_inv 3 2e-3
SHARDS=${SHARDS:-1}
if [ "$SHARDS" -le 1 ]; then
  $VD compare --config configs/zoo-cifar10.yaml --out "$OUT" --no-progress
else
  threads=$(( $(nproc) / SHARDS )); [ "$threads" -ge 1 ] || threads=1
  mkdir -p "$OUT"; pids=()
  for k in $(seq 1 "$SHARDS"); do
    $VD compare --config configs/zoo-cifar10.yaml --out "$OUT" --no-progress --set "train.threads=$threads" \
      --shard "$k/$SHARDS" > "$OUT/shard$k.log" 2>&1 &
    pids+=($!)
  done
  for k in "${!pids[@]}"; do
    wait "${pids[$k]}" || { echo "shard $((k + 1)) failed: see $OUT/shard$((k + 1)).log" >&2; exit 1; }
  done
  $VD compare --out "$OUT" --report-only
fi
