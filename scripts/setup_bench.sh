#!/usr/bin/env bash
# Set up the environment for the benchmarks (idempotent): the core install plus the bench extra
# (peer optimizers from pytorch-optimizer, mnist1d). Then, e.g.:
#   source .venv/bin/activate && DS_ACCELERATOR=cpu python -m benchmarks regimes --quick
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DS_DHO2_EXTRAS="${DS_DHO2_EXTRAS:-dev,bench}" exec bash "$ROOT/scripts/setup_env.sh"
