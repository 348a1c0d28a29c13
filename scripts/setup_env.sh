#!/usr/bin/env bash
# Create ./.venv with dsplan, the real training stack (LLaMA-Factory 0.9.5,
# DeepSpeed 0.19.8, a matching torch trio), pytest and matplotlib (report --plot).  Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
    -c scripts/constraints-cpu.txt -e ".[train,test,plot]"
.venv/bin/dsplan --version
