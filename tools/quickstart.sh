#!/usr/bin/env bash
# The README's two commands.
#   bash tools/quickstart.sh demo [section.key=value ...]   set up, build the synthetic set, train
#   bash tools/quickstart.sh test [pytest args ...]         set up, run the whole test suite
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
case "$mode" in demo|test) shift ;; *) echo "usage: $0 demo|test [args...]" >&2; exit 2 ;; esac
bash tools/setup_env.sh
PY=.venv/bin/python
if [ "$mode" = test ]; then
  # The Slurm tests start a real two-node cluster; as root the packages are installed here and
  # the tests are required to run (elsewhere they are skipped, saying why).
  if [ "$(id -u)" = 0 ] && bash tools/setup_slurm.sh; then export MEGACLIP_REQUIRE_SLURM=1; fi
  exec "$PY" -m pytest tests "$@"
fi
data=data/synthetic
[ -f "$data/eval/classes.json" ] || "$PY" tools/make_synthetic.py --out "$data" --train-samples 20000
[ -f "$data/spm.model" ] || "$PY" tools/train_tokenizer.py --out "$data/spm" --vocab-size 128 \
  --shards "$data/train/shard-{000000..000019}.tar"
# Two CPU processes (DeepSpeed's launcher counts them as "GPUs"), ZeRO-3, fp32 on the CPU.
exec .venv/bin/deepspeed --num_gpus 2 megaclip/train.py --deepspeed_config ds_configs/zero3_cpu.json \
  --config clip_tiny_synthetic --resume auto "$@"
