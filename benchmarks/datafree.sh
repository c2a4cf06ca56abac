#!/usr/bin/env bash
# Data-free distillation (DeepInversion, src/vitdistill/datafree.py): a CNN teacher, IMAGES synthetic
# images made from it, then one ViT student four ways per seed: labels only on real training images,
# logit-kd on real images, labels only on the synthetic images, logit-kd on the synthetic images
# (the data-free student). Every student is scored on the same real test split. One thread per
# process; a step whose result is already there is skipped, so the script resumes.
# Usage: bash benchmarks/datafree.sh [OUT] [SEED ...]
#   DATA=digits (default): the demo's teacher recipe (trained here, seed 0) and students
#     (vit_femto_patch4_16, 40 epochs); IMAGES=1440 (the real training split has 1,438); OUT
#     defaults to runs/datafree-digits, seeds to 0 1 2.
#   DATA=cifar10: the recipe's teacher (runs/cifar10/teacher; benchmarks/cifar10_recipe.sh trains
#     it), vit_pico_patch4_32 students for 30 epochs, the real runs on IMAGES=1280 training images
#     (a fixed subset of that size, as many as were synthesised); OUT runs/datafree-cifar10, seed 0.
#   ITERS (default 300) is the optimisation steps per synthetic batch; SYNTH_SETS="k=v ..." adds
#   synthesis overrides, e.g. SYNTH_SETS="synth.base_size=8".
# Then: .venv/bin/python benchmarks/datafree_table.py OUT   (JSON summary)
set -euo pipefail
DATA=${DATA:-digits}
VD=${VD:-.venv/bin/vitdistill}
ITERS=${ITERS:-300}
EXTRA=(); for kv in ${SYNTH_SETS:-}; do EXTRA+=(--set "$kv"); done
case $DATA in
  digits)
    OUT=${1:-runs/datafree-digits}; IMAGES=${IMAGES:-1440}; DEFAULT_SEEDS="0 1 2"
    SRC=(--data digits); STUDENT=vit_femto_patch4_16; REAL_LIMIT=()
    RECIPE=(--batch-size 64 --lr 2e-3 --set train.warmup_epochs=2 --threads 1 --no-progress)
    STUDENT_ARGS=(--epochs 40 "${RECIPE[@]}"); SYNTH_ARGS=(--set synth.grey=true)
    T=$OUT/teacher ;;
  cifar10)
    OUT=${1:-runs/datafree-cifar10}; IMAGES=${IMAGES:-1280}; DEFAULT_SEEDS="0"
    SRC=(--config configs/cifar10.yaml); STUDENT=vit_pico_patch4_32
    REAL_LIMIT=(--set "data.train_limit=$IMAGES")
    STUDENT_ARGS=(--epochs 30 --threads 1 --no-progress); SYNTH_ARGS=()
    T=runs/cifar10/teacher
    [ -f "$T/summary.json" ] || { echo "no finished teacher at $T: run benchmarks/cifar10_recipe.sh first" >&2; exit 2; } ;;
  *) echo "DATA must be digits or cifar10" >&2; exit 2 ;;
esac
shift || true
SEEDS=${*:-$DEFAULT_SEEDS}
mkdir -p "$OUT"
timed() {  # name command...: run once, under /usr/bin/time -v, unless its summary exists
  local name=$1; shift
  [ -f "$OUT/$name/summary.json" ] && return 0
  /usr/bin/time -v -o "$OUT/$name.time" "$@" > "$OUT/$name.log" 2>&1
}
if [ "$DATA" = digits ]; then
  timed teacher $VD train --data digits --model resnet_micro_cnn --epochs 15 --seed 0 --out "$T" "${RECIPE[@]}"
fi
if [ ! -f "$OUT/synthetic/images.safetensors" ]; then
  /usr/bin/time -v -o "$OUT/synthetic.time" $VD synthesize "${SRC[@]}" --teacher resnet_micro_cnn \
    --teacher-weights "$T" --images "$IMAGES" --iters "$ITERS" "${SYNTH_ARGS[@]}" "${EXTRA[@]}" --seed 0 --threads 1 \
    --no-progress --out "$OUT/synthetic" > "$OUT/synthetic.log" 2>&1
fi
TEACH=(--teacher resnet_micro_cnn --teacher-weights "$T")
SYN=(--data "synthetic:$OUT/synthetic")
for s in $SEEDS; do
  timed "real-none-s$s" $VD train "${SRC[@]}" "${REAL_LIMIT[@]}" --model $STUDENT --seed "$s" \
    --out "$OUT/real-none-s$s" "${STUDENT_ARGS[@]}"
  timed "real-kd-s$s" $VD distill "${SRC[@]}" "${REAL_LIMIT[@]}" "${TEACH[@]}" --student $STUDENT \
    --method logit-kd --seed "$s" --out "$OUT/real-kd-s$s" "${STUDENT_ARGS[@]}"
  timed "synth-none-s$s" $VD train "${SRC[@]}" "${SYN[@]}" --model $STUDENT --seed "$s" \
    --out "$OUT/synth-none-s$s" "${STUDENT_ARGS[@]}"
  timed "synth-kd-s$s" $VD distill "${SRC[@]}" "${SYN[@]}" "${TEACH[@]}" --student $STUDENT \
    --method logit-kd --seed "$s" --out "$OUT/synth-kd-s$s" "${STUDENT_ARGS[@]}"
done
.venv/bin/python benchmarks/datafree_table.py "$OUT"
