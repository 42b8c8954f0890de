#!/bin/bash
# SparK pre-training on Slurm: 4 nodes x 8 GPUs = 32 processes, ResNet-50, official recipe
# (global batch 128 x 32 = 4096). Submit with:  sbatch docs/slurm_pretrain.sh
#
# One task per GPU: srun starts 32 copies of tools/pretrain.py; each maps SLURM_PROCID /
# SLURM_NTASKS / SLURM_LOCALID to its rank / world size / GPU, and takes MASTER_ADDR from
# the first host of SLURM_NODELIST (no scontrol needed). MASTER_PORT defaults to
# 29500 + (job id mod 1000); set it below to pin it.
#
# Pre-emption and time limits: `--signal=USR1@180` makes Slurm send SIGUSR1 to every task
# 3 minutes before the time limit (pre-emption and scancel send SIGTERM). On either signal
# every rank finishes its current step, rank 0 writes last.pth (all ranks wait for it, so
# --kill-on-bad-exit cannot cut the write short), and each task exits with
# status 75. This script then requeues the job; the requeued job starts with resume=auto
# and continues from last.pth (same step, lr, data order, random streams and wandb run).
# A rank that hangs is named after train.dist_timeout seconds (default 600) and the job
# fails instead of waiting; requeue it by hand (scontrol requeue JOBID) once fixed.
#
#SBATCH --job-name=spark-r50
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=USR1@180
#SBATCH --output=logs/%x-%j.out

set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
mkdir -p logs

# wandb: offline by default (sync later with `wandb sync outputs/pretrain/resnet50/wandb/offline-run-*`);
# export WANDB_MODE=online here to stream, or WANDB_MODE=disabled to turn it off.
export WANDB_MODE="${WANDB_MODE:-offline}"
export OMP_NUM_THREADS=8
# export MASTER_PORT=29500
# export NCCL_DEBUG=WARN

PREEMPTED=75   # the trainer's exit status after a signal: checkpoint written, run again with resume=auto

# The batch shell itself must survive the signal and wait for the tasks to write last.pth.
trap 'echo "$(date -u +%FT%TZ) batch shell: got a signal, waiting for the tasks to checkpoint"' USR1 TERM

srun --kill-on-bad-exit=1 .venv/bin/python tools/pretrain.py \
    -c configs/pretrain/resnet50.yaml \
    data.root=/datasets/imagenet/train \
    output_dir=outputs/pretrain/resnet50 \
    train.dist_timeout=600 \
    resume=auto &
SRUN_PID=$!
wait $SRUN_PID; status=$?
while kill -0 $SRUN_PID 2>/dev/null; do wait $SRUN_PID; status=$?; done  # a trapped signal interrupts wait

if [ "$status" -eq "$PREEMPTED" ]; then
    echo "$(date -u +%FT%TZ) pre-empted with a checkpoint: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
