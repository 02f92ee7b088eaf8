#!/usr/bin/env bash
# The main job on a fresh machine: install, then the quickstart sweep (CE vs COT vs GCE on real MNIST images
# shipped with an installed package) on the embedded MLflow server. Extra arguments go to `gce-sweep run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/gce-sweep run quickstart "$@"
