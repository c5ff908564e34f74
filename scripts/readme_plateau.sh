#!/usr/bin/env bash
# Regenerate docs/tutorial/plateau_example/: unfreeze_on_plateau against early_unfreeze and
# gradual_unfreeze on the same real CIFAR-10 images (mobilenet_v2 with its ImageNet weights,
# 64 px, 1000 train / 400 val), each stage's modules given in MobileNetV2's names
# (features.14-18 stand for resnet's layer4). docs/tutorial/plateau.md quotes the printed lines.
# Usage: scripts/readme_plateau.sh [CIFAR10_IMAGEFOLDER_ROOT]
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-../shared/data/cifar10}
runs=$(mktemp -d)
trap 'rm -rf "$runs"' EXIT
top='[features.14, features.15, features.16, features.17, features.18]'
mid='[features.7, features.8, features.9, features.10, features.11, features.12, features.13]'
common=(data.dataset=imagefolder "data.root=$root" model.arch=mobilenet_v2 data.image_size=64
  data.train_size=1000 data.val_size=400 train.epochs=8 "out_dir=$runs")
train() { .venv/bin/finetune train "configs/$1.yaml" --run-dir "$runs/$1" --set "${common[@]}" "${@:2}"; }

train unfreeze_on_plateau "train.unfreeze=[{name: top, modules: $top, after: plateau, patience: 1, min_delta: 0.002, \
max_epochs: 4, restore_best: true}, {modules: [backbone], after: plateau, patience: 1, min_delta: 0.002, \
min_epochs: 2, max_epochs: 3, restore_best: true}]" | tee "$runs/plateau.log"
train early_unfreeze
train gradual_unfreeze "train.unfreeze=[{epoch: 1, name: top, modules: $top}, {epoch: 2, name: middle, modules: $mid}, \
{epoch: 3, modules: [backbone]}]"
.venv/bin/finetune compare "$runs" --out "$runs/comparison"
rm -rf docs/tutorial/plateau_example && mkdir -p docs/tutorial/plateau_example
cp "$runs/comparison/comparison.md" "$runs/comparison/curves.png" "$runs/plateau.log" docs/tutorial/plateau_example/
cp "$runs/unfreeze_on_plateau/results.csv" docs/tutorial/plateau_example/unfreeze_on_plateau_results.csv
