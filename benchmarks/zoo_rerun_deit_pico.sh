#!/usr/bin/env bash
# Re-runs the CNN-taught cells of the CIFAR-10 zoo (configs/zoo-cifar10.yaml) whose student is
# deit_pico_distilled_patch4_32, on the shared input statistics of commit 427cf22: deit-soft, dearkd,
# manifold and vitkd, with the recipe's teacher (runs/cifar10/teacher, benchmarks/cifar10_recipe.sh)
# and the zoo's settings (configs/cifar10.yaml, 6 epochs, seed 0, live teacher, one thread each).
# Two queues of two cells side by side, each command under /usr/bin/time -v. The recipe's own
# student-none and student-deit-hard runs are the no-KD and deit-hard cells of the same protocol.
# Usage: bash benchmarks/zoo_rerun_deit_pico.sh [OUT]   (default runs/zoo-rerun)
#        .venv/bin/python benchmarks/recipe_table.py OUT deit-soft dearkd manifold vitkd
set -euo pipefail
OUT=${1:-runs/zoo-rerun}
VD=${VD:-.venv/bin/vitdistill}
T=${TEACHER:-runs/cifar10/teacher}
[ -f "$T/summary.json" ] || { echo "no finished teacher at $T: run benchmarks/cifar10_recipe.sh first" >&2; exit 2; }
mkdir -p "$OUT"
cell() {  # method [extra args]
  local m=$1; shift
  [ -f "$OUT/$m/summary.json" ] && return 0
  local resume=""; [ -f "$OUT/$m/checkpoint.pt" ] && resume="--resume"
  /usr/bin/time -v -o "$OUT/$m.time" $VD distill --config configs/cifar10.yaml --teacher resnet_micro_cnn \
    --teacher-weights "$T" --student deit_pico_distilled_patch4_32 --method "$m" --epochs 6 \
    --out "$OUT/$m" --threads 1 --no-progress $resume "$@" > "$OUT/$m.log" 2>&1
}
( cell deit-soft && cell dearkd --set method.stage1_epochs=5 ) & a=$!
( cell manifold && cell vitkd ) & b=$!
wait $a && wait $b
