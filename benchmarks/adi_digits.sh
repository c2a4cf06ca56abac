#!/usr/bin/env bash
# Adaptive DeepInversion on the digits (src/vitdistill/datafree.py): a second round of synthetic
# digits made to compete with a data-free student of the first round, against a plain second round
# of the same seed; then one logit-kd student on each. Needs the tuned run of benchmarks/datafree.sh
# (SYNTH_SETS="synth.base_size=8 synth.bn_weight=0.5" bash benchmarks/datafree.sh runs/datafree-digits-tuned).
# The two syntheses and the two students run side by side, one thread each. Prints one JSON object.
# Usage: bash benchmarks/adi_digits.sh [OUT] [WEIGHT]   (defaults runs/adi-digits, 0.2, the paper's)
set -euo pipefail
OUT=${1:-runs/adi-digits}; WEIGHT=${2:-0.2}
VD=${VD:-.venv/bin/vitdistill}; PY=${PY:-.venv/bin/python}
BASE=${BASE:-runs/datafree-digits-tuned}
T=$BASE/teacher; S1=$BASE/synth-kd-s0
[ -f "$S1/summary.json" ] || { echo "no first-round student at $S1: run benchmarks/datafree.sh as above" >&2; exit 2; }
mkdir -p "$OUT"
COMMON=(--data digits --teacher resnet_micro_cnn --teacher-weights "$T" --images 1440 --iters 300
        --set synth.grey=true --set synth.base_size=8 --set synth.bn_weight=0.5 --seed 1 --threads 1 --no-progress)
[ -f "$OUT/plain/images.safetensors" ] || $VD synthesize "${COMMON[@]}" --out "$OUT/plain" > "$OUT/plain.log" 2>&1 &
[ -f "$OUT/adi/images.safetensors" ] || $VD synthesize "${COMMON[@]}" --student "$S1" \
  --set "synth.competition_weight=$WEIGHT" --out "$OUT/adi" > "$OUT/adi.log" 2>&1 &
wait
R=(--teacher resnet_micro_cnn --teacher-weights "$T" --student vit_femto_patch4_16 --method logit-kd --epochs 40
   --batch-size 64 --lr 2e-3 --set train.warmup_epochs=2 --threads 1 --no-progress --seed 0)
for v in plain adi; do
  [ -f "$OUT/kd-$v/summary.json" ] || $VD distill --data "synthetic:$OUT/$v" "${R[@]}" --out "$OUT/kd-$v" \
    > "$OUT/kd-$v.log" 2>&1 &
done
wait
$PY - "$OUT" "$S1" <<'PY'
import json, sys
import torch
from vitdistill.data import load_data
from vitdistill.engine.evaluate import accuracy, predict
from vitdistill.evaluation import load_student
from vitdistill.models import InputPrep

out, first = sys.argv[1], sys.argv[2]
_, _, _, model = load_student(first, None, "digits", "benchmark")
prep = InputPrep.for_model(model)
row = {}
for v in ("plain", "adi"):
    images = load_data(f"synthetic:{out}/{v}").train
    logits = predict(lambda x: model(prep(x.float())), images, 256, torch.device("cpu"))
    synth = json.load(open(f"{out}/{v}/synth.json"))
    row[v] = {"first_student_top1_on_images": round(accuracy(logits, images.labels)["top1"], 4),
              "teacher_top1_on_images": synth["teacher_top1_on_synthetic"], "synth_wall_s": synth["wall_s"],
              "compete": synth["last_batch_loss"].get("compete"),
              "student_top1_real_test": json.load(open(f"{out}/kd-{v}/summary.json"))["student_top1"]}
print(json.dumps(row))
PY
