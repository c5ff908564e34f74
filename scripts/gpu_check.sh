#!/usr/bin/env bash
# The GPU checks in one command, for a bare GPU machine with no network and no pip (torch,
# torchvision, pandas, scikit-learn, matplotlib, tqdm and pyyaml installed; the project runs
# from PYTHONPATH). Writes one log (and the benchmark's bench.md / bench.csv) to OUT.
#
#   scripts/gpu_check.sh --prepare             # here: copy a CIFAR-10 subset and the weights to .gpu/
#   scripts/gpu_check.sh [OUT]                 # there: run from the repo root (.gpu/ carried along)
#   CHECK_DEVICE=cpu CHECK_SMALL=1 PYTHON=.venv/bin/python scripts/gpu_check.sh /tmp/dry   # dry run on a CPU
#
# What it runs (under 6 minutes on an H200): the seed's three setups (MobileNetV2 ImageNet,
# 224 px, 3000 train / 800 val) with finetune, as one `finetune sweep`, and with the seed's
# loop, plus the raw train step; a short fp16 run stopped by SIGINT and resumed; and a 2-epoch
# run under torchrun (nccl, one process).
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=.gpu/cifar10
WEIGHTS=.gpu/mobilenet_v2-b0353104.pth

if [ "${1:-}" = "--prepare" ]; then
  src=${2:-../shared/data/cifar10}
  rm -rf "$DATA"
  for split_count in train:300 test:80; do
    split=${split_count%:*} count=${split_count#*:}
    for class_dir in "$src/$split"/*/; do
      class=$(basename "$class_dir")
      mkdir -p "$DATA/$split/$class"
      ls "$class_dir" | sort | head -n "$count" | while read -r f; do cp "$class_dir/$f" "$DATA/$split/$class/"; done
    done
  done
  cp "${WEIGHTS_SOURCE:-../shared/weights/mobilenet_v2-b0353104.pth}" "$WEIGHTS"
  du -sh .gpu
  exit 0
fi

OUT=${1:-${OUT:-gpu_check_out}}
DEVICE=${CHECK_DEVICE:-cuda}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCH_HOME=$(mktemp -d)
mkdir -p "$TORCH_HOME/hub/checkpoints" && cp "$WEIGHTS" "$TORCH_HOME/hub/checkpoints/"
if [ -n "${CHECK_SMALL:-}" ]; then
  SIZE=64 TRAIN=200 VAL=100 EPOCHS=2
else
  SIZE=224 TRAIN=3000 VAL=800 EPOCHS=3
fi
status=0
step() { echo; echo "=== $* ($(date +%T))"; "$@" || { echo "FAILED ($?): $*"; status=1; }; }

exec > >(tee "$LOG") 2>&1
echo "gpu_check on $(hostname), device $DEVICE, $(date -u)"
"$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

step "$PY" scripts/bench.py --device "$DEVICE" --data "$DATA" --arch mobilenet_v2 --weights DEFAULT \
  --size "$SIZE" --train "$TRAIN" --val "$VAL" --epochs "$EPOCHS" --seed 42 --out "$OUT"

precision=fp16; [ "$DEVICE" = cpu ] && precision=bf16  # fp16 needs a GPU
run="$(mktemp -d)/fp16"
sets=(data.dataset=imagefolder "data.root=$DATA" data.image_size=64 "data.train_size=$TRAIN" "data.val_size=$VAL"
      data.batch_size=16 train.epochs=2 "device=$DEVICE" "precision=$precision" train.feature_cache=off)
echo; echo "=== $precision train, SIGINT in epoch 2, resume ($(date +%T))"
"$PY" -m finetune train configs/early_unfreeze.yaml --run-dir "$run" --set "${sets[@]}" model.arch=mobilenet_v2 &
pid=$!
for _ in $(seq 600); do [ -s "$run/results.csv" ] && break; sleep 0.1; done
sleep 0.5; kill -INT $pid; wait $pid; code=$?
echo "exit code after SIGINT: $code (130 expected)"; [ $code -eq 130 ] || status=1
step "$PY" -m finetune train --resume "$run"
step "$PY" -c "import pandas as pd; print(pd.read_csv('$run/results.csv').to_string())"

echo; echo "=== torchrun, one process, nccl (gloo on CPU), 2 epochs ($(date +%T))"
step "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m finetune train configs/early_unfreeze.yaml \
  --run-dir "$(mktemp -d)/ddp" --set "${sets[@]}" model.arch=mobilenet_v2

echo; echo "gpu_check finished with status $status at $(date +%T)"
exit $status
