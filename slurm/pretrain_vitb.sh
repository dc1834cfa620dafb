#!/bin/bash
# MaskCLIP ViT-B/16 on 8-GPU nodes, ZeRO-3 bf16.
#   sbatch slurm/pretrain_vitb.sh
#   CONFIG=clip_vitb16 TRAIN_SHARDS='/data/yfcc15m/{00000..01499}.tar' sbatch --nodes=4 slurm/pretrain_vitb.sh
# Pre-emption and time limits: as in pretrain_vitl.sh (SIGUSR1 -> checkpoint -> requeue -> resume).
#SBATCH --job-name=megaclip-vitb16
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.log
CONFIG=${CONFIG:-maskclip_vitb16}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3_bf16.json}
# (a brace pattern cannot sit inside ${VAR:-default}: its braces would end the expansion)
[ -n "${TRAIN_SHARDS:-}" ] || TRAIN_SHARDS='/data/yfcc15m/{00000..01499}.tar'
TOKENIZER=${TOKENIZER:-/data/spm32k.model}
source "${MEGACLIP_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
