# Sourced by quickstart.sh and test.sh: create .venv if missing and install the package.
# torch/torchvision are pinned to the releases pip finds on this disk, so no resolver
# ever pulls a multi-GB torch from the network on a machine that has them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv"
  "$PYTHON" -m venv .venv
fi
extras=${FINETUNE_EXTRAS:-}
stamp=".venv/.installed${extras:+-$extras}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "installing finetune${extras:+[$extras]} into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras:+[$extras]}" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import finetune, torch, torchvision" 
  touch "$stamp"
fi
