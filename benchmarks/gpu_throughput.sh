#!/usr/bin/env bash
# GPU throughput benchmark (docs/benchmarks.md): DeiT-Tiny with its distillation token
# (deit_tiny_distilled_patch16_224, from scratch) taught by a CNN (resnet50, from scratch) with
# deit-hard at 224 px, bf16 autocast, batch 128: vitdistill's loop (online and from a teacher cache)
# against timm's TokenDistillationTask fed by a DataLoader, plus the in-memory limits.
#
#   1. synthetic ImageNet-shaped data: random 224 px uint8 images, 1000 classes (no data set needed);
#   2. the CIFAR-10 JPEG copy upsampled to 224 px (vitdistill: resized once in memory; timm: an
#      ImageFolder of the 32 px JPEGs, padded crop at 32 px, then timm's resize to 224 in the workers).
#
#   (between them, a short third run: the online loop on the synthetic data with the teacher in
#   channels-last memory and on a side CUDA stream, train.channels_last and train.teacher_stream.)
#
# All runs together stay under 5 minutes on one H200-class GPU with 16 CPU cores (each is killed
# at its timeout and prints what it has). Usage:
#
#   bash benchmarks/gpu_throughput.sh [OUT_DIR]        # JSON lines in OUT_DIR (default $OUT or runs/gpu-throughput)
#
# Environment: PYTHON (default .venv/bin/python, else python3; src/ is put on PYTHONPATH when the
# package is not installed), DATA (the CIFAR-10 JPEG folder, default ../shared/datasets/cifar10-jpeg;
# the second run is skipped when it is missing), TEACHER (resnet50; regnety_016 is a lighter
# choice), BATCH (128), STEPS (40 measured steps per epoch), WARMUP (10), REPEATS (3 epochs, median),
# THREADS (4 torch threads), WORKERS (12 DataLoader workers for timm's path), TIMEOUT (140 s per run);
# for a dry run elsewhere: DEVICE (cuda), AMP (bf16), STUDENT, STUDENT_KWARGS, TEACHER_KWARGS (JSON).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import vitdistill" 2>/dev/null; then
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
OUT_DIR=${1:-${OUT:-runs/gpu-throughput}}
DATA=${DATA:-../shared/datasets/cifar10-jpeg}
TEACHER=${TEACHER:-resnet50}
TEACHER_KWARGS=${TEACHER_KWARGS:-"{}"}
STUDENT=${STUDENT:-deit_tiny_distilled_patch16_224}
STUDENT_KWARGS=${STUDENT_KWARGS:-"{}"}
DEVICE=${DEVICE:-cuda}
AMP=${AMP:-bf16}
BATCH=${BATCH:-128}
STEPS=${STEPS:-40}
WARMUP=${WARMUP:-10}
REPEATS=${REPEATS:-3}
THREADS=${THREADS:-4}
WORKERS=${WORKERS:-12}
TIMEOUT=${TIMEOUT:-140}
mkdir -p "$OUT_DIR"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  "$PY" -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__)"
  echo "cpus $(nproc)"; } | tee "$OUT_DIR/env.txt"

COMMON=(--device "$DEVICE" --amp "$AMP" --batch "$BATCH" --steps "$STEPS" --warmup "$WARMUP" --repeats "$REPEATS"
        --threads "$THREADS" --workers "$WORKERS" --img-size 224
        --student "$STUDENT" --student-kwargs "$STUDENT_KWARGS"
        --teachers cnn --cnn-teacher "$TEACHER" --cnn-teacher-kwargs "$TEACHER_KWARGS")

run() {  # name, extra arguments...
  local name=$1; shift
  local start=$SECONDS
  timeout "$TIMEOUT" "$PY" benchmarks/throughput.py "${COMMON[@]}" "$@" > "$OUT_DIR/$name.jsonl" \
    2> >(tee "$OUT_DIR/$name.log" >&2)
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "{\"run\": \"$name\", \"error\": \"exit status $rc after $((SECONDS - start)) s (124: timeout); see $name.log\"}" \
      >> "$OUT_DIR/$name.jsonl"
  fi
  cat "$OUT_DIR/$name.jsonl"
}

run synthetic_224 --synthetic-only --synthetic-classes 1000
# the speed switches on the same synthetic data, vitdistill's online loop only (a short run)
TIMEOUT=${TIMEOUT_SWITCHES:-60} run synthetic_224_switches --synthetic-only --synthetic-classes 1000 \
  --channels-last --teacher-stream --skip limits,augment,cached,timm
if [ -f "$DATA/train.tar.gz" ]; then
  run cifar10_224 --data "cifar10:$DATA"
else
  echo "{\"run\": \"cifar10_224\", \"error\": \"no $DATA/train.tar.gz; set DATA to the CIFAR-10 JPEG folder\"}" \
    | tee "$OUT_DIR/cifar10_224.jsonl"
fi
