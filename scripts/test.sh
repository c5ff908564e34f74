#!/usr/bin/env bash
# Set up (first time only) and run lint, format check and the tests.
FINETUNE_EXTRAS=test,all  # the optional extras too, so their tests run
source "$(dirname "$0")/env.sh"
.venv/bin/ruff check src tests scripts
.venv/bin/ruff format --check src tests scripts
exec .venv/bin/python -m pytest "$@"
