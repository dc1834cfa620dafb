#!/usr/bin/env bash
# Installs what the two-node Slurm test cluster needs (Debian/Ubuntu, as root): slurmctld,
# slurmd, slurm-client, munge. Does nothing when they are already there. Exit 1 if it cannot.
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
   && command -v munged >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "[setup] the Slurm test cluster needs root and apt-get (slurmctld slurmd slurm-client munge)" >&2
  exit 1
fi
echo "[setup] installing slurmctld slurmd slurm-client munge"
apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
