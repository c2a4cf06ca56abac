#!/usr/bin/env bash
# Re-runs the CIFAR-10 zoo cells (configs/zoo-cifar10.yaml) whose student is
# deit_pico_distilled_patch4_32, on the shared input statistics of commit 427cf22, with the zoo's
# settings (configs/cifar10.yaml, 6 epochs, seed 0, live teacher, one thread each), two cells side
# by side, each command under /usr/bin/time -v. The recipe's own student-none and student-deit-hard
# runs (benchmarks/cifar10_recipe.sh) are the no-KD and deit-hard cells of the same protocol.
# Usage: bash benchmarks/zoo_rerun_deit_pico.sh [OUT]   (default runs/zoo-rerun)
#          CNN-taught: deit-soft then dearkd, beside manifold then vitkd, with the recipe's teacher
#          (runs/cifar10/teacher; train it first with benchmarks/cifar10_recipe.sh)
#        VIT=1 bash benchmarks/zoo_rerun_deit_pico.sh [OUT]
#          ViT-taught: attention beside minivit, with the zoo's ViT teacher (runs/cifar10/vit-teacher,
#          trained first when missing, as benchmarks/zoo_cifar10.sh does)
#        .venv/bin/python benchmarks/recipe_table.py OUT deit-soft dearkd manifold vitkd attention minivit
set -euo pipefail
OUT=${1:-runs/zoo-rerun}
VD=${VD:-.venv/bin/vitdistill}
mkdir -p "$OUT"
if [ "${VIT:-0}" = 1 ]; then
  TNAME=vit_pico_patch4_32; T=runs/cifar10/vit-teacher
  if [ ! -f "$T/summary.json" ]; then
    resume=""; [ -f "$T/checkpoint.pt" ] && resume="--resume"
    $VD train --config configs/cifar10.yaml --model $TNAME --epochs 10 --lr 1e-3 --out "$T" --no-progress $resume
  fi
else
  TNAME=resnet_micro_cnn; T=runs/cifar10/teacher
  [ -f "$T/summary.json" ] || { echo "no finished teacher at $T: run benchmarks/cifar10_recipe.sh first" >&2; exit 2; }
fi
cell() {  # method [extra args]
  local m=$1; shift
  [ -f "$OUT/$m/summary.json" ] && return 0
  local resume=""; [ -f "$OUT/$m/checkpoint.pt" ] && resume="--resume"
  /usr/bin/time -v -o "$OUT/$m.time" $VD distill --config configs/cifar10.yaml --teacher $TNAME \
    --teacher-weights "$T" --student deit_pico_distilled_patch4_32 --method "$m" --epochs 6 \
    --out "$OUT/$m" --threads 1 --no-progress $resume "$@" > "$OUT/$m.log" 2>&1
}
if [ "${VIT:-0}" = 1 ]; then
  cell attention & a=$!
  cell minivit & b=$!
else
  ( cell deit-soft && cell dearkd --set method.stage1_epochs=5 ) & a=$!
  ( cell manifold && cell vitkd ) & b=$!
fi
wait $a && wait $b
