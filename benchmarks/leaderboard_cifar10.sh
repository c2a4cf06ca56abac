#!/usr/bin/env bash
# The CIFAR-10 leaderboard of docs/results.md: trains the two extra teachers the grid needs (the ViT
# teacher of attention and minivit, the involution teacher of co-advise; each skipped once finished,
# resumed when interrupted), then runs configs/leaderboard-cifar10.yaml with `vitdistill compare`,
# which trains the CNN teacher, writes one teacher cache per seed and runs 14 cells x 3 seeds.
# Rerun the same command after an interruption: finished runs are skipped.
# Usage: bash benchmarks/leaderboard_cifar10.sh            (CPU budget, runs/leaderboard-cifar10)
#        CONFIG=configs/leaderboard-cifar10-gpu.yaml OUT=runs/leaderboard-cifar10-gpu EPOCHS_VIT=30 EPOCHS_INV=10 TEST_LIMIT=null bash benchmarks/leaderboard_cifar10.sh
# The wall time of the whole grid, teachers included, lands in OUT/wall_s.
set -euo pipefail
CONFIG=${CONFIG:-configs/leaderboard-cifar10.yaml}
OUT=${OUT:-runs/leaderboard-cifar10}   # the cells' teacher_weights in CONFIG point here
VD=${VD:-.venv/bin/vitdistill}
BASE=${BASE:-configs/cifar10.yaml}   # the two extra teachers' run config (a compare config is not one)
EPOCHS_VIT=${EPOCHS_VIT:-3}
EPOCHS_INV=${EPOCHS_INV:-1}
TEST_LIMIT=${TEST_LIMIT:-5000}   # null for the GPU config
mkdir -p "$OUT/teachers"
START=$(date +%s)
teacher() {  # name model epochs lr: on the whole training split, scored on the grid's test subset
  local out=$OUT/teachers/$1
  [ -f "$out/summary.json" ] && return 0
  local resume=""; [ -f "$out/checkpoint.pt" ] && resume="--resume"
  $VD train --config "$BASE" --model "$2" --epochs "$3" --lr "$4" --set "data.test_limit=$TEST_LIMIT" \
    --set train.warmup_epochs=0.5 --out "$out" --no-progress $resume
}
teacher vit vit_pico_patch4_32 "$EPOCHS_VIT" 2e-3
teacher inv rednet_micro_inv "$EPOCHS_INV" 2e-3
$VD compare --config "$CONFIG" --out "$OUT" --no-progress
echo $(( $(date +%s) - START )) > "$OUT/wall_s"
echo "grid wall time: $(cat "$OUT/wall_s") s (this invocation)"
