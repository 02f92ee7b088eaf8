#!/usr/bin/env bash
# The main job on a fresh machine: install, then a short GCE training run of LeNet-5 on real MNIST images
# that ship with an installed package (offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/gce-sweep train --dataset mnist5k --model lenet5 --loss gce --epochs 3 "$@"
