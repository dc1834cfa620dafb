#!/usr/bin/env bash
# Creates (or reuses) the virtual environment for megaclip and links it as .venv.
# The environment lives in a cache outside the checkout, keyed by requirements.txt (and by the
# torch build when it is not the registry's), so a fresh clone reuses it. Override the cache
# with MEGACLIP_VENV_CACHE.
# Which torch: megaclip/install.py reads the NVIDIA driver from nvidia-smi and picks the registry's
# torch (a CUDA 13 build: driver R580+, and the CPU) or the newest CUDA build of torch's own index
# that the driver runs. Overrides: MEGACLIP_TORCH_CUDA=cu126|cu128|cu130|cpu|pypi,
# MEGACLIP_TORCH_INDEX=<index URL>, MEGACLIP_WHEELHOUSE=<folder from tools/wheelhouse.sh: no network>.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0
fi
VENV_KEY= TORCH_TAG= TORCH_PIP_ARGS= TORCH_OFFLINE= TORCH_WHY=
choice=$("$PY" megaclip/install.py torch --shell) || exit 2
eval "$choice"
echo "[setup] torch build: $TORCH_TAG ($TORCH_WHY)"
key=$VENV_KEY
cache=${MEGACLIP_VENV_CACHE:-$HOME/.cache/megaclip}
venv="$cache/venv-$key"
pin() { grep "^$1==" requirements.txt | cut -d= -f3; }
if [ ! -f "$venv/.complete" ]; then
  echo "[setup] building environment $venv (torch, deepspeed, ...; a few minutes the first time)"
  rm -rf "$venv"
  mkdir -p "$cache"
  "$PY" -m venv "$venv"
  # shellcheck disable=SC2086
  if [ -n "$TORCH_OFFLINE" ]; then
    "$venv/bin/pip" install -q $TORCH_PIP_ARGS -r requirements.txt
  else
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q $TORCH_PIP_ARGS torch=="$(pin torch)" torchvision=="$(pin torchvision)"
    "$venv/bin/pip" install -q -r requirements.txt
  fi
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
