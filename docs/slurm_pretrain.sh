#!/bin/bash
# SparK pre-training on Slurm: 4 nodes x 8 GPUs = 32 processes, ResNet-50, official recipe
# (global batch 128 x 32 = 4096). Submit with:  sbatch docs/slurm_pretrain.sh
#
# One task per GPU: srun starts 32 copies of tools/pretrain.py; each maps SLURM_PROCID /
# SLURM_NTASKS / SLURM_LOCALID to its rank / world size / GPU, and takes MASTER_ADDR from
# the first host of SLURM_NODELIST (no scontrol needed). MASTER_PORT defaults to
# 29500 + (job id mod 1000); set it below to pin it.
# The job is requeue-safe: resume=auto continues from <output_dir>/last.pth (same step,
# lr, data order and wandb run) if the job was pre-empted or hit its time limit.
#
#SBATCH --job-name=spark-r50
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --output=logs/%x-%j.out

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
mkdir -p logs

# wandb: offline by default (sync later with `wandb sync outputs/pretrain/resnet50/wandb/offline-run-*`);
# export WANDB_MODE=online here to stream, or WANDB_MODE=disabled to turn it off.
export WANDB_MODE="${WANDB_MODE:-offline}"
export OMP_NUM_THREADS=8
# export MASTER_PORT=29500
# export NCCL_DEBUG=WARN

# requeue on the pre-emption / time-limit signal; the resumed job picks up last.pth
trap 'echo "caught USR1, requeueing"; scontrol requeue "$SLURM_JOB_ID"' USR1

srun --kill-on-bad-exit=1 .venv/bin/python tools/pretrain.py \
    -c configs/pretrain/resnet50.yaml \
    data.root=/datasets/imagenet/train \
    output_dir=outputs/pretrain/resnet50 \
    resume=auto &
wait
