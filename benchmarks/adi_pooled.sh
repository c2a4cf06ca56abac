#!/usr/bin/env bash
# Adaptive DeepInversion's protocol: the student of the second round learns from both rounds'
# images (--data synthetic:A,B). Pools the first round of benchmarks/datafree.sh (tuned) with the
# plain and with the ADI second round of benchmarks/adi_digits.sh, and trains the same logit-kd
# student on each pool over SEEDS, two runs side by side at one thread each. Prints one JSON object.
# Usage: bash benchmarks/adi_pooled.sh [OUT]   (default runs/adi-pooled; SEEDS="0 1 2";
#        VARIANTS="plain adi": second rounds under $ADI, e.g. VARIANTS=adi-w1 for a round made with weight 1)
set -euo pipefail
OUT=${1:-runs/adi-pooled}; SEEDS=${SEEDS:-0 1 2}; VARIANTS=${VARIANTS:-plain adi}
VD=${VD:-.venv/bin/vitdistill}; PY=${PY:-.venv/bin/python}
BASE=${BASE:-runs/datafree-digits-tuned}; ADI=${ADI:-runs/adi-digits}
T=$BASE/teacher; R1=$BASE/synthetic
for f in "$R1" $(for v in $VARIANTS; do echo "$ADI/$v"; done); do
  [ -f "$f/images.safetensors" ] || { echo "no synthetic set at $f: run benchmarks/datafree.sh and adi_digits.sh" >&2; exit 2; }
done
mkdir -p "$OUT"
R=(--teacher resnet_micro_cnn --teacher-weights "$T" --student vit_femto_patch4_16 --method logit-kd --epochs 40
   --batch-size 64 --lr 2e-3 --set train.warmup_epochs=2 --threads 1 --no-progress)
for s in $SEEDS; do
  for v in $VARIANTS; do
    [ -f "$OUT/kd-$v-s$s/summary.json" ] || $VD distill --data "synthetic:$R1,$ADI/$v" "${R[@]}" --seed "$s" \
      --out "$OUT/kd-$v-s$s" > "$OUT/kd-$v-s$s.log" 2>&1 &
  done
  wait
done
$PY - "$OUT" "$VARIANTS" $SEEDS <<'PY'
import json, statistics, sys
out, variants, seeds = sys.argv[1], sys.argv[2].split(), sys.argv[3:]
row = {}
for v in variants:
    runs = [json.load(open(f"{out}/kd-{v}-s{s}/summary.json")) for s in seeds]
    top1 = [r["student_top1"] for r in runs]
    row[v] = {"seeds": seeds, "top1": [round(t, 4) for t in top1], "mean": round(statistics.mean(top1), 4),
              "wall_s": [r["wall_s"] for r in runs]}
print(json.dumps(row))
PY
