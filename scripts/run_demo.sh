#!/usr/bin/env bash
# Set up the environment (idempotent) and run the main demo: a short multi-process DeepSpeed training
# run comparing DHO2 with AdamW on bundled data. Arguments are passed to `python -m benchmarks.demo`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup_env.sh
# shellcheck disable=SC1091
source .venv/bin/activate

# Everything the demo reads is on disk; never try the network.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"

exec python -m benchmarks.demo "$@"
