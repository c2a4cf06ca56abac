#!/usr/bin/env bash
# The CIFAR-10 recipe of docs/results.md: teacher, no-KD student, deit-hard student, each under
# /usr/bin/time -v for wall time and peak resident memory. Usage: bash benchmarks/cifar10_recipe.sh [OUT]
set -euo pipefail
OUT=${1:-runs/cifar10}
VD=${VD:-.venv/bin/vitdistill}
mkdir -p "$OUT"
/usr/bin/time -v -o "$OUT/teacher.time" $VD train --config configs/cifar10.yaml --model resnet_micro_cnn \
  --lr 2e-3 --epochs 10 --out "$OUT/teacher" --no-progress
/usr/bin/time -v -o "$OUT/student-none.time" $VD train --config configs/cifar10.yaml --model vit_pico_patch4_32 \
  --epochs 6 --out "$OUT/student-none" --no-progress
/usr/bin/time -v -o "$OUT/student-deit-hard.time" $VD distill --config configs/cifar10.yaml \
  --teacher resnet_micro_cnn --teacher-weights "$OUT/teacher" --student deit_pico_distilled_patch4_32 \
  --method deit-hard --epochs 6 --out "$OUT/student-deit-hard" --no-progress
for r in teacher student-none student-deit-hard; do
  echo "$r: $(grep -E 'Elapsed|Maximum resident' "$OUT/$r.time" | tr -s ' ' | tr '\n' ' ')"
done
