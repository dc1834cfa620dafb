#!/usr/bin/env bash
# Builds a wheelhouse (every wheel megaclip needs, for a named Python and platform) or installs
# from one with no network: tools/wheelhouse.py --help. Runs with $PYTHON or python3.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" tools/wheelhouse.py "$@"
