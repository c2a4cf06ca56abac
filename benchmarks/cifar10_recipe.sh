#!/usr/bin/env bash
# The CIFAR-10 recipe of docs/results.md: a CNN teacher, then three students sharing the 2 cores at
# one thread each (the no-KD ViT, the deit-hard ViT with the live teacher, and the deit-hard ViT from
# a teacher cache written first). Each command runs under /usr/bin/time -v for wall time, CPU time and
# peak resident memory; benchmarks/recipe_table.py turns the folder into the results table.
# Usage: bash benchmarks/cifar10_recipe.sh [OUT]   (default runs/cifar10)
#        CACHE=0 bash benchmarks/cifar10_recipe.sh OUT   runs the teacher and the two students only
#        (the 90-minute budget); the whole recipe's wall time lands in OUT/wall_s.
set -euo pipefail
OUT=${1:-runs/cifar10}
VD=${VD:-.venv/bin/vitdistill}
CFG=configs/cifar10.yaml
CACHE=${CACHE:-1}
mkdir -p "$OUT"
START=$(date +%s)
timed() { local name=$1; shift; /usr/bin/time -v -o "$OUT/$name.time" "$@" > "$OUT/$name.log" 2>&1; }

timed teacher $VD train --config $CFG --model resnet_micro_cnn --lr 2e-3 --epochs 10 --out "$OUT/teacher" --no-progress

timed student-none $VD train --config $CFG --model vit_pico_patch4_32 --epochs 6 --out "$OUT/student-none" \
  --threads 1 --no-progress &
timed student-deit-hard $VD distill --config $CFG --teacher resnet_micro_cnn --teacher-weights "$OUT/teacher" \
  --student deit_pico_distilled_patch4_32 --method deit-hard --epochs 6 --out "$OUT/student-deit-hard" \
  --threads 1 --no-progress &
[ "$CACHE" = 1 ] && ( timed teacher-cache $VD cache-teacher --config $CFG --teacher resnet_micro_cnn --teacher-weights "$OUT/teacher" \
    --epochs 6 --cache "$OUT/teacher-cache" --threads 1 --no-progress &&
  timed student-deit-hard-cached $VD distill --config $CFG --teacher-cache "$OUT/teacher-cache" \
    --student deit_pico_distilled_patch4_32 --method deit-hard --epochs 6 --out "$OUT/student-deit-hard-cached" \
    --threads 1 --no-progress ) &
wait
echo $(( $(date +%s) - START )) > "$OUT/wall_s"
.venv/bin/python benchmarks/recipe_table.py "$OUT"
