#!/usr/bin/env bash
# The CUDA path on one GPU in about ten minutes (tools/gpu_check.py --help); exits 0 with a
# message where no GPU is visible. Uses .venv when it exists, else $PYTHON or python3.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" tools/gpu_check.py "$@"
