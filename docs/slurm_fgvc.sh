#!/bin/bash
# MetaFormer fine-tuning on Slurm: 1 node x 8 GPUs, iNaturalist 2021, MetaFormer-2 at 384 px (official
# recipe; total batch 16 x 8 = 128). Submit with:  sbatch docs/slurm_fgvc.sh
#
# One task per GPU: srun starts 8 copies of the trainer; each maps SLURM_PROCID / SLURM_NTASKS /
# SLURM_LOCALID to its rank / world size / GPU and takes MASTER_ADDR from the first host of
# SLURM_NODELIST. MASTER_PORT defaults to 29500 + (job id mod 1000).
#
# Pre-emption and time limits: --signal=USR1@180 has Slurm send SIGUSR1 to every task 3 minutes
# before the time limit (pre-emption and scancel send SIGTERM). On either signal every rank finishes
# its current optimizer step, rank 0 writes <output_dir>/last.pth (at that step, mid-epoch if need
# be), and the trainer exits with status 75. This script then requeues the job; the requeued job
# runs the same command, and resume=auto continues from last.pth: the same step, lr, data order,
# augmentation and wandb run, bit-exactly. (resume=auto on an empty output_dir starts the run, so the
# first submission and the requeues use one command.)
#
#SBATCH --job-name=fgvc-inat21-mf2
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@180
#SBATCH --output=logs/%x-%j.out

set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
mkdir -p logs

# wandb: offline by default; everything the run needs for `wandb sync` stays in the output folder:
#   wandb sync outputs/inat2021_metaformer2_384/wandb/offline-run-*
export WANDB_MODE="${WANDB_MODE:-offline}"
export OMP_NUM_THREADS=8
REQUEUE_STATUS=75   # the trainers' "stopped by a pre-emption signal, checkpoint written" exit status

srun --kill-on-bad-exit=1 .venv/bin/python tools/train_fgvc.py \
    -c configs/fgvc/inat2021_metaformer2_384.yaml \
    data.root=/datasets/inat2021 \
    resume=auto
status=$?

if [ "$status" -eq "$REQUEUE_STATUS" ]; then
    echo "stopped by a pre-emption / time-limit signal with a checkpoint; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$status"
