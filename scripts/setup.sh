#!/usr/bin/env bash
# Create .venv and install the project with its dev tools. Idempotent: reinstalls only when the project's
# dependency files change. torch/torchvision versions come from constraints/local.txt (local disk here).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.gce-install-stamp
want=$(cat pyproject.toml constraints/local.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints/local.txt -e '.[dev]'
# Test-only reference implementation; it pins an old `requests`, so never let it touch dependencies.
.venv/bin/python -m pip install -q --no-deps torchattacks==3.5.1
# The original AutoAttack code (fra31/auto-attack), for the agreement test and the evaluation benchmark.
.venv/bin/python -m pip install -q --no-deps pyautoattack==0.2.0
echo "$want" > "$stamp"
