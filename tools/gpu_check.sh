#!/usr/bin/env bash
# The CUDA path on one GPU within a short slot (tools/gpu_check.py --help); exits 0 with a
# message where no GPU is visible. Uses $PYTHON, else .venv when it exists, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" tools/gpu_check.py "$@"
