#!/usr/bin/env bash
# Set up (first time only) and run lint, format check and the tests: all of them (as CI does),
# or with --fast first, only those that neither start processes, train a model nor need an
# extra (the tiers are set in tests/conftest.py). Any other arguments go to pytest.
FINETUNE_EXTRAS=test,all  # the optional extras too, so their tests run
source "$(dirname "$0")/env.sh"
.venv/bin/ruff check src tests scripts
.venv/bin/ruff format --check src tests scripts
if [ "${1:-}" = "--fast" ]; then
  shift
  set -- -m "not process and not training and not extras" "$@"
fi
exec .venv/bin/python -m pytest "$@"
