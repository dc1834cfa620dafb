#!/usr/bin/env bash
# Creates (or reuses) the virtual environment for megaclip and links it as .venv.
# The environment lives in a cache outside the checkout, keyed by requirements.txt, so a fresh
# clone reuses it. Override the cache with MEGACLIP_VENV_CACHE.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
key=$(sha256sum requirements.txt | cut -c1-16)
cache=${MEGACLIP_VENV_CACHE:-$HOME/.cache/megaclip}
venv="$cache/venv-$key"
if [ ! -f "$venv/.complete" ]; then
  echo "[setup] building environment $venv (torch, deepspeed, ...; a few minutes the first time)"
  rm -rf "$venv"
  mkdir -p "$cache"
  "$PY" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q torch==$(grep '^torch==' requirements.txt | cut -d= -f3) \
                            torchvision==$(grep '^torchvision==' requirements.txt | cut -d= -f3)
  "$venv/bin/pip" install -q -r requirements.txt
  touch "$venv/.complete"
fi
# The install's log goes to a file of its own (not a fixed name in /tmp another user could own).
log=$(mktemp "${TMPDIR:-/tmp}/megaclip-setup.XXXXXX")
if ! "$venv/bin/pip" install -q --no-deps --no-build-isolation -e . >"$log" 2>&1; then
  cat "$log"; echo "[setup] the log above is kept in $log" >&2; exit 1
fi
rm -f "$log"
ln -sfn "$venv" .venv
echo "[setup] environment ready: .venv -> $venv"
