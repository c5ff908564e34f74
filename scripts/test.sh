#!/usr/bin/env bash
# Set up (first time only) and run lint, format check and the tests: all of them and the docs
# site's strict build (as CI does), or with --fast first, only the tests that neither start
# processes, train a model nor need an extra (the tiers are set in tests/conftest.py), and no
# site build. Any other arguments go to pytest.
FINETUNE_EXTRAS=test,all,docs  # the optional extras too, so their tests run; docs: mkdocs
source "$(dirname "$0")/env.sh"
.venv/bin/ruff check src tests scripts
.venv/bin/ruff format --check src tests scripts
if [ "${1:-}" = "--fast" ]; then
  shift
  set -- -m "not process and not training and not extras" "$@"
else
  # the documentation site: a broken link, image or anchor fails the build (a few seconds)
  NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir site
fi
exec .venv/bin/python -m pytest "$@"
