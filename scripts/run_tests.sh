#!/usr/bin/env bash
# Set up the environment (idempotent) and run the test suite on the CPU, offline.
# Arguments are passed to pytest, e.g. `bash scripts/run_tests.sh tests/data -x` or `-m benchmark`.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# the bench extra too: the tests check the benchmarks' peer optimizers and generated data
DS_DHO2_EXTRAS="${DS_DHO2_EXTRAS:-dev,bench}" bash scripts/setup_env.sh || { echo "[run_tests] environment setup failed" >&2; exit 1; }
# shellcheck disable=SC1091
source .venv/bin/activate

export DS_ACCELERATOR=cpu
export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

python -m pytest -q "$@"
rc=$?
if [[ $rc -eq 5 ]]; then
    echo "[run_tests] pytest collected no tests; treating as failure" >&2
    exit 1
fi
exit $rc
