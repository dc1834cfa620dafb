# Shared by the sbatch scripts in this folder: environment, NCCL settings and the srun launch.
# Every variable below has a default and can be set by the caller:
#   MEGACLIP_ROOT   repository checkout (default: the directory sbatch was called from)
#   PYTHON          interpreter with megaclip's requirements (default: $MEGACLIP_ROOT/.venv/bin/python)
#   CONFIG          experiment file or bundled name        DS_CONFIG   DeepSpeed JSON
#   TRAIN_SHARDS    WebDataset pattern                     TOKENIZER   SentencePiece model
#   OUTPUT_DIR      checkpoints, TensorBoard, config       EXTRA_ARGS  more section.key=value overrides
set -euo pipefail
MEGACLIP_ROOT=${MEGACLIP_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$MEGACLIP_ROOT"
PYTHON=${PYTHON:-$MEGACLIP_ROOT/.venv/bin/python}
OUTPUT_DIR=${OUTPUT_DIR:-runs/${SLURM_JOB_NAME:-megaclip}}
EXTRA_ARGS=${EXTRA_ARGS:-}

# NCCL: the settings multi-node clusters commonly need. Each is only a default.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # fail, don't hang
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}          # InfiniBand retry timeout (4.096us * 2^22)
export NCCL_SOCKET_NTHREADS=${NCCL_SOCKET_NTHREADS:-4}
export NCCL_NSOCKS_PERTHREAD=${NCCL_NSOCKS_PERTHREAD:-4}
# Set these for your fabric if NCCL picks the wrong one (e.g. NCCL_SOCKET_IFNAME=ib0 or ^lo,docker):
[ -n "${NCCL_SOCKET_IFNAME:-}" ] && export NCCL_SOCKET_IFNAME
[ -n "${NCCL_IB_HCA:-}" ] && export NCCL_IB_HCA
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# Rendezvous: the first host of the allocation (scontrol show hostnames); the port is derived from
# the job id, outside the kernel's ephemeral port range, unless set.
# DeepSpeed's ops (FusedAdam) compile in a node-local folder, $TMPDIR/megaclip-ext-$USER, unless
# TORCH_EXTENSIONS_DIR is set (megaclip/extensions.py).
# (megaclip/cluster.py turns SLURM_PROCID/LOCALID/NTASKS into RANK/LOCAL_RANK/WORLD_SIZE.)
[ -n "${MASTER_PORT:-}" ] && export MASTER_PORT

echo "[megaclip] job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}:" \
     "${SLURM_NNODES:-?} node(s) x ${SLURM_NTASKS_PER_NODE:-?} task(s); config $CONFIG; output $OUTPUT_DIR"
# One task per GPU; every task is a rank. --resume auto picks up the newest complete checkpoint,
# so a requeued job continues where it stopped. The job is requeued by the trainer itself after
# it has written the checkpoint that a pre-emption signal asked for.
# shellcheck disable=SC2086
# Slurm 22.05+ no longer passes the job's --cpus-per-task on to srun: pass it, or each task gets
# one CPU and its data workers share it.
cpus=()
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && cpus=(-c "$SLURM_CPUS_PER_TASK")
srun --kill-on-bad-exit=1 --cpu-bind=none ${cpus[@]+"${cpus[@]}"} "$PYTHON" -u megaclip/train.py \
  --config "$CONFIG" --deepspeed_config "$DS_CONFIG" --resume auto \
  data.train_shards="$TRAIN_SHARDS" data.tokenizer="$TOKENIZER" train.output_dir="$OUTPUT_DIR" \
  $EXTRA_ARGS
