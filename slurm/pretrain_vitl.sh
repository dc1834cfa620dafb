#!/bin/bash
# MaskCLIP ViT-L/14 on several 8-GPU nodes, ZeRO-3 bf16.
#   sbatch slurm/pretrain_vitl.sh
#   TRAIN_SHARDS='/data/laion/{000000..041407}.tar' TOKENIZER=/data/spm32k.model sbatch slurm/pretrain_vitl.sh
# Slurm sends SIGUSR1 five minutes before the time limit; the trainer then checkpoints at the
# next step and requeues the job, which resumes by itself. `scancel --signal=USR1 <job>` does
# the same by hand. Logs: logs/<job name>-<job id>.log (appended across requeues).
#SBATCH --job-name=megaclip-vitl14
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.log
CONFIG=${CONFIG:-maskclip_vitl14}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3_bf16.json}
# (a brace pattern cannot sit inside ${VAR:-default}: its braces would end the expansion)
[ -n "${TRAIN_SHARDS:-}" ] || TRAIN_SHARDS='/data/laion400m/{000000..041407}.tar'
TOKENIZER=${TOKENIZER:-/data/spm32k.model}
source "${MEGACLIP_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
