#!/usr/bin/env bash
# Every method of the zoo on the CIFAR-10 recipe: trains the three teachers the grid needs (each
# skipped when its run already finished), then runs configs/zoo-cifar10.yaml with `vitdistill
# compare` (resumable: rerun the same command after an interruption).
# Usage: bash benchmarks/zoo_cifar10.sh [OUT]   (default runs/zoo-cifar10; teachers in runs/cifar10)
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
$VD compare --config configs/zoo-cifar10.yaml --out "$OUT" --no-progress
