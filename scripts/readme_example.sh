#!/usr/bin/env bash
# Regenerate docs/tutorial/example/ (the seed's three setups, compared with `finetune compare`,
# with each run's printed lines) and docs/tutorial/sweep_example/ (the LR-after-unfreeze sweep
# over two seeds), both on real CIFAR-10 (mobilenet_v2, 64 px, 1000 train / 400 val images).
# The tutorial (docs/tutorial/) shows the results.
# Usage: scripts/readme_example.sh [CIFAR10_IMAGEFOLDER_ROOT]
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-../shared/data/cifar10}
runs=$(mktemp -d)
logs=$(mktemp -d)
trap 'rm -rf "$runs" "$logs" "${sweep:-}"' EXIT

for setup in feature_extract early_unfreeze finetune_all; do
  .venv/bin/finetune train "configs/$setup.yaml" --run-dir "$runs/$setup" --set \
    data.dataset=imagefolder "data.root=$root" model.arch=mobilenet_v2 \
    data.image_size=64 data.train_size=1000 data.val_size=400 "out_dir=$runs" | tee "$logs/$setup.log"
done
rm -rf docs/tutorial/example
.venv/bin/finetune compare "$runs" --out docs/tutorial/example
cp "$logs"/*.log docs/tutorial/example/

# The workflow's practice question as one sweep: LR after the unfreeze 1e-4 vs 1e-5, two seeds.
sweep=$(mktemp -d)
.venv/bin/finetune sweep configs/lr_after_unfreeze.yaml --grid train.lr_backbone=1e-4,1e-5 --seeds 0,1 \
  --out "$sweep" --set data.dataset=imagefolder "data.root=$root" model.arch=mobilenet_v2 \
  data.image_size=64 data.train_size=1000 data.val_size=400
rm -rf docs/tutorial/sweep_example && cp -r "$sweep/comparison" docs/tutorial/sweep_example
