#!/usr/bin/env bash
# Set up (first time only) and run the main job on data and weights that need no network.
source "$(dirname "$0")/env.sh"
.venv/bin/python scripts/install_weights.py || echo "continuing: set model.weights=none if the weights are missing"
exec .venv/bin/finetune train configs/quickstart.yaml "$@"
