#!/usr/bin/env bash
# Data-free distillation on the embedded digits (DeepInversion, src/vitdistill/datafree.py).
# A resnet_micro_cnn teacher with the demo's recipe (seed 0), then IMAGES synthetic digits from it,
# then the demo's ViT student four ways on each seed: no-KD on the real training digits, logit-kd on
# the real digits, labels only on the synthetic digits, logit-kd on the synthetic digits. Every
# student is scored on the same 359 real test digits. One thread per process; each step is skipped
# when its result is already there, so the script resumes.
# Usage: bash benchmarks/datafree_digits.sh [OUT] [SEED ...]   (default runs/datafree-digits, seeds 0 1 2)
#        IMAGES=1440 ITERS=300 (the defaults) set the synthesis size and steps per batch.
#        .venv/bin/python benchmarks/datafree_table.py OUT      prints the JSON summary again
set -euo pipefail
OUT=${1:-runs/datafree-digits}; shift || true
SEEDS=${*:-0 1 2}
VD=${VD:-.venv/bin/vitdistill}
IMAGES=${IMAGES:-1440}; ITERS=${ITERS:-300}
RECIPE=(--batch-size 64 --lr 2e-3 --set train.warmup_epochs=2 --threads 1 --no-progress)
mkdir -p "$OUT"
timed() {  # name command...: run once, under /usr/bin/time -v, unless its summary exists
  local name=$1; shift
  [ -f "$OUT/$name/summary.json" ] && return 0
  /usr/bin/time -v -o "$OUT/$name.time" "$@" > "$OUT/$name.log" 2>&1
}
timed teacher $VD train --data digits --model resnet_micro_cnn --epochs 15 --seed 0 --out "$OUT/teacher" "${RECIPE[@]}"
if [ ! -f "$OUT/synthetic/images.safetensors" ]; then
  /usr/bin/time -v -o "$OUT/synthetic.time" $VD synthesize --data digits --teacher resnet_micro_cnn \
    --teacher-weights "$OUT/teacher" --images "$IMAGES" --iters "$ITERS" --set synth.grey=true --seed 0 \
    --threads 1 --no-progress --out "$OUT/synthetic" > "$OUT/synthetic.log" 2>&1
fi
T=(--teacher resnet_micro_cnn --teacher-weights "$OUT/teacher")
S=(--epochs 40 "${RECIPE[@]}")
for s in $SEEDS; do
  timed "real-none-s$s" $VD train --data digits --model vit_femto_patch4_16 --seed "$s" --out "$OUT/real-none-s$s" "${S[@]}"
  timed "real-kd-s$s" $VD distill --data digits "${T[@]}" --student vit_femto_patch4_16 --method logit-kd \
    --seed "$s" --out "$OUT/real-kd-s$s" "${S[@]}"
  timed "synth-none-s$s" $VD train --data "synthetic:$OUT/synthetic" --model vit_femto_patch4_16 --seed "$s" \
    --out "$OUT/synth-none-s$s" "${S[@]}"
  timed "synth-kd-s$s" $VD distill --data "synthetic:$OUT/synthetic" "${T[@]}" --student vit_femto_patch4_16 \
    --method logit-kd --seed "$s" --out "$OUT/synth-kd-s$s" "${S[@]}"
done
.venv/bin/python benchmarks/datafree_table.py "$OUT"
