#!/usr/bin/env bash
# GPU check of sparse_mim in one call (see docs/gpu.md); its Python part is repotools/gpu_check.py (a clone's
# development tooling, not installed). Sections, most informative first:
#   env        torch build, compute capability, driver, spconv build; stops everything, with the fix, when the
#              torch build has no kernels for the GPU (e.g. a V100 under a CUDA 13 build)
#   precision  the full pre-training step (ResNet-50, ConvNeXt-S at 224) under fp32 (TF32 off / on), fp16 and
#              bf16, sparse-autotuned and dense-masked; which precision amp=auto should take here, and whether
#              the table in sparse_mim/utils/amp.py agrees
#   convs      fp16 sparse convs (spconv) against the dense-masked twin at ResNet-50 / ConvNeXt-S channel counts
#   syncs      host-device synchronisations of one pre-training step (CUDA's sync debug mode + aten recorder)
#   ddp        pre-training with one process per visible GPU (NCCL, SyncBatchNorm, the autotune broadcast and the
#              dead-peer check run with 2+ GPUs; says so plainly with one), then resume=auto from its checkpoint
#   checks     every conv mode on backbones vs dense-masked and CPU, SparK, amp settings
#   autotune   (only when named in GPU_CHECK_STEPS) the autotuner's tables under fp16 / bf16
#   bench_ops, bench_backbone   the op and backbone benchmarks
# Each section runs under a time limit within GPU_CHECK_BUDGET (default 540 s) even if an earlier one failed; its
# result is written as soon as it has it ($OUT/gpu_check/SUMMARY.txt, */results.jsonl), so a time-out keeps what
# was done. Rerunning in the same folder works (each section replaces its own output).
#
#   bash tools/gpu_check.sh                                          # on a machine with a GPU
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 bash tools/gpu_check.sh   # dry run without a GPU (DDP: 2 gloo processes)
#
# Needs the packages of requirements.txt in the Python it runs ($PYTHON, default python3); spconv is optional.
# Knobs: GPU_CHECK_BUDGET (s), GPU_CHECK_QUICK=1 (small shapes), GPU_CHECK_DEVICE=cpu, GPU_CHECK_STEPS (sections),
# GPU_CHECK_TIME_SCALE (multiplies every section's time limit and the default budget; 5 on the CPU).
set -uo pipefail   # no -e: a failing section is recorded and the next one runs

cd "$(dirname "$0")/.."
ROOT=$PWD

OUT=${OUT:-$ROOT/gpu_check_out}
LOG=$OUT/gpu_check
mkdir -p "$LOG"
exec > >(tee -a "$LOG/gpu_check.log") 2>&1
DEVICE=${GPU_CHECK_DEVICE:-cuda}   # cpu: dry-run of this script on a machine without a GPU
# section time limits are sized for one H100; a CPU dry run gets them times GPU_CHECK_TIME_SCALE (default 5 on cpu)
SCALE=${GPU_CHECK_TIME_SCALE:-$([[ $DEVICE == cpu ]] && echo 5 || echo 1)}
BUDGET=${GPU_CHECK_BUDGET:-$(( 540 * SCALE ))}
STEPS=${GPU_CHECK_STEPS:-"env precision convs syncs ddp checks bench_ops bench_backbone"}
QUICK=${GPU_CHECK_QUICK:-0}
PY=${PYTHON:-python3}
export WANDB_MODE=disabled PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
START=$SECONDS
SUMMARY_FILE=$LOG/SUMMARY.txt
: > "$SUMMARY_FILE"   # this run's summary (a rerun replaces the previous one)

echo "== gpu_check $(date -u +%FT%TZ) in $ROOT, output $LOG, budget ${BUDGET}s, device $DEVICE"
nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv 2>/dev/null \
  || echo "nvidia-smi: not available"

# summarise LINE: appended at once, so a run cut short keeps every finished section
summarise() { echo "$1" | tee -a "$SUMMARY_FILE"; }

# run_step NAME TIMEOUT CMD...: runs CMD with a timeout capped by the remaining budget; records PASS/FAIL.
run_step() {
  local name=$1 limit=$(( $2 * SCALE )); shift 2
  if [[ " $STEPS " != *" $name "* ]]; then summarise "SKIP  $name (not in GPU_CHECK_STEPS)"; return 0; fi
  local left=$(( BUDGET - (SECONDS - START) ))
  if (( left < 20 )); then summarise "SKIP  $name (budget spent)"; return 0; fi
  (( limit > left )) && limit=$left
  echo; echo "== section $name (timeout ${limit}s, $(( SECONDS - START ))s elapsed)"
  ( set -x; timeout --signal=TERM --kill-after=10 "$limit" "$@" ) > "$LOG/$name.log" 2>&1
  local rc=$?
  tail -n 30 "$LOG/$name.log"
  if (( rc == 0 )); then summarise "PASS  $name"; elif (( rc == 124 || rc == 137 )); then
    summarise "FAIL  $name (timed out after ${limit}s; see $name.log)"; else summarise "FAIL  $name (exit $rc; see $name.log)"; fi
  return $rc
}

# run_bench NAME TIMEOUT SCRIPT ARGS...: a benchmark script, its stdout (the table) saved as NAME.md.
run_bench() {
  local name=$1 limit=$2 script=$3; shift 3
  run_step "$name" "$limit" bash -c "$PY $script $* > '$LOG/$name.md'"
  [[ -s "$LOG/$name.md" ]] && cat "$LOG/$name.md"
}

quick_flag=""
if (( QUICK )); then quick_flag="--quick"; fi
check() {  # check NAME TIMEOUT CHECKS...: tools/gpu_check.py sections into $LOG/NAME/
  local name=$1 limit=$2; shift 2
  rm -rf "$LOG/$name"
  run_step "$name" "$limit" $PY tools/gpu_check.py --device "$DEVICE" --out "$LOG/$name" --only "$@" $quick_flag
}

# env first: a torch build without kernels for this GPU stops the whole check here, with the fix
if ! check env 120 env && [[ " $STEPS " == *" env "* ]]; then
  if grep -q "has kernels for" "$LOG/env.log"; then
    echo; echo "== gpu_check stopped: the torch build cannot run on this GPU (the line above says how to fix it)"
    exit 1
  fi
fi
check precision 270 precision
[[ -f "$LOG/precision/precision.md" ]] && cat "$LOG/precision/precision.md"
check convs 60 convs
check syncs 60 syncs
# DDP: one process per visible GPU (2 gloo processes in the CPU dry run), then resume=auto from its checkpoint.
# The run folder is this section's own scratch: removed first, so a rerun does not meet the run-folder guard.
if [[ "$DEVICE" == "cpu" ]]; then NPROC=2; else
  NPROC=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
fi
DDP_DIR=$LOG/pretrain_ddp
rm -rf "$DDP_DIR"
if [[ " $STEPS " == *" ddp "* ]]; then
  if (( NPROC < 2 )); then
    summarise "NOTE  ddp: only ${NPROC} GPU visible: one process, so NCCL, SyncBatchNorm, the autotune broadcast and the dead-peer check are NOT exercised"
  else
    if [[ "$DEVICE" == "cpu" ]]; then
      echo "== ddp: $NPROC processes on the CPU (gloo): the autotune broadcast and the dead-peer check run; SyncBatchNorm needs CUDA (each process keeps its own statistics)"
    else
      echo "== ddp: $NPROC processes on $NPROC GPUs (NCCL): SyncBatchNorm, the autotune broadcast and the dead-peer check run"
    fi
  fi
fi
(( NPROC < 1 )) && NPROC=1
DDP_ARGS="device=$DEVICE model.backbone=resnet18 model.img_size=[64,64] data.builtin_images=64 data.num_workers=1 \
  data.batch_size=4 train.amp=auto train.conv_backend=autotune train.dist_timeout=120 log.progress=false \
  log.vis_every=0 checkpoint.export_backbone=false"
run_step ddp 150 bash -c "$PY -m torch.distributed.run --standalone --nproc_per_node=$NPROC tools/pretrain.py \
  output_dir=$DDP_DIR $DDP_ARGS train.epochs=1 && test -f $DDP_DIR/last.pth && grep -q '$NPROC process(es)' '$LOG/ddp.log' && \
  $PY -m torch.distributed.run --standalone --nproc_per_node=$NPROC tools/pretrain.py output_dir=$DDP_DIR \
  $DDP_ARGS train.epochs=2 resume=auto && grep -q 'resumed from' '$LOG/ddp.log'"

check checks 150 backbone spark amp
check autotune 120 autotune   # not in the default sections: precision times autotune / table / dense-masked already

bench_ops_args="" bench_backbone_args=""
if (( QUICK )); then  # the dry run: small shapes, a few models
  bench_ops_args="--size 64 --batch 2 --repeats 1 --modes table --only conv3x3,dw7x7"
  bench_backbone_args="--models resnet18 convnextv2_atto --input-size 64 --batch-size 2 --repeats 1 --no-memory"
fi
run_bench bench_ops 60 tools/benchmark_sparse_ops.py --device $DEVICE $bench_ops_args
run_bench bench_backbone 60 tools/benchmark_backbone.py --device $DEVICE $bench_backbone_args

echo; echo "== gpu_check summary ($(( SECONDS - START ))s; logs in $LOG)"
cat "$SUMMARY_FILE"
for results in "$LOG"/*/results.json; do
  [[ -f "$results" ]] && $PY -c "import json; [print(f\"  {r['status']:5s} {r['check']}: {r['detail']}\") for r in json.load(open('$results'))]"
done
grep -q '^FAIL' "$SUMMARY_FILE" && exit 1
exit 0
