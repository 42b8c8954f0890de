#!/usr/bin/env bash
# GPU check of sparse_mim in one call (see docs/gpu.md): numerical equivalence of the sparse
# engine on CUDA under every conv mode (autotune, table, each forced path) against the
# dense-masked simulation and the CPU, fp16 autocast + GradScaler, the autotuner's choices and
# the full pre-training step autotune / table / dense-masked under fp16 and bf16 autocast, a
# one-process DDP pre-training run (torchrun) with resume, and the op / backbone benchmarks.
# Every step runs even if an earlier one failed; the end prints PASS / FAIL per step.
# Logs and tables go to $OUT/gpu_check/ (OUT defaults to ./gpu_check_out).
#
#   bash tools/gpu_check.sh                                   # on a machine with a GPU
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 bash tools/gpu_check.sh   # dry run without a GPU
#
# Needs the packages of requirements.txt in the Python it runs ($PYTHON, default python3);
# spconv is optional (the check reports whether it imports and skips its path if not).
# Environment knobs: GPU_CHECK_BUDGET (seconds for all steps, default 540), GPU_CHECK_QUICK=1
# (small shapes), GPU_CHECK_DEVICE=cpu, GPU_CHECK_STEPS="checks autotune ddp bench_ops bench_backbone".
set -uo pipefail   # no -e: a failing step is recorded and the next one runs

cd "$(dirname "$0")/.."
ROOT=$PWD

OUT=${OUT:-$ROOT/gpu_check_out}
LOG=$OUT/gpu_check
mkdir -p "$LOG"
exec > >(tee -a "$LOG/gpu_check.log") 2>&1
BUDGET=${GPU_CHECK_BUDGET:-540}
STEPS=${GPU_CHECK_STEPS:-"checks autotune ddp bench_ops bench_backbone"}
QUICK=${GPU_CHECK_QUICK:-0}
DEVICE=${GPU_CHECK_DEVICE:-cuda}   # cpu: dry-run of this script on a machine without a GPU
PY=${PYTHON:-python3}
export WANDB_MODE=disabled PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
START=$SECONDS
declare -a SUMMARY=()

echo "== gpu_check $(date -u +%FT%TZ) in $ROOT, output $LOG, budget ${BUDGET}s"
set -x
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
$PY -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" || true
{ set +x; } 2>/dev/null

# run_step NAME TIMEOUT CMD...: runs CMD with a timeout capped by the remaining budget; records PASS/FAIL.
run_step() {
  local name=$1 limit=$2; shift 2
  if [[ " $STEPS " != *" $name "* ]]; then SUMMARY+=("SKIP  $name (not in GPU_CHECK_STEPS)"); return; fi
  local left=$(( BUDGET - (SECONDS - START) ))
  if (( left < 20 )); then SUMMARY+=("SKIP  $name (budget spent)"); return; fi
  (( limit > left )) && limit=$left
  echo; echo "== step $name (timeout ${limit}s, $(( SECONDS - START ))s elapsed)"
  ( set -x; timeout --signal=TERM --kill-after=10 "$limit" "$@" ) > "$LOG/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$LOG/$name.log"
  if (( rc == 0 )); then SUMMARY+=("PASS  $name"); elif (( rc == 124 || rc == 137 )); then
    SUMMARY+=("FAIL  $name (timed out after ${limit}s; see $name.log)"); else SUMMARY+=("FAIL  $name (exit $rc; see $name.log)"); fi
}

# run_bench NAME TIMEOUT SCRIPT ARGS...: a benchmark script, its stdout (the table) saved as NAME.md.
run_bench() {
  local name=$1 limit=$2 script=$3; shift 3
  if [[ ! -f "$script" ]]; then SUMMARY+=("FAIL  $name ($script not found)"); return; fi
  run_step "$name" "$limit" bash -c "$PY $script $* > '$LOG/$name.md'"
  [[ -s "$LOG/$name.md" ]] && cat "$LOG/$name.md"
}

quick_flag=""
if (( QUICK )); then quick_flag="--quick"; fi

# 1. the autotuner on this GPU: its choice per scale (every candidate's time) and the full SparK step
#    autotune / table / dense-masked, ResNet-50 and ConvNeXt-S at 224, fp16 and bf16 autocast
run_step autotune 240 $PY tools/gpu_check.py --device $DEVICE --out "$LOG/autotune" --only env autotune $quick_flag
[[ -f "$LOG/autotune/autotune.md" ]] && cat "$LOG/autotune/autotune.md"

# 2. numerical checks: every conv mode on backbones vs dense-masked and CPU, SparK, fp16 + GradScaler
run_step checks 200 $PY tools/gpu_check.py --device $DEVICE --out "$LOG/checks" --only env backbone spark amp $quick_flag

# 3. one-process DDP pre-training (torchrun), tiny config on built-in images, then resume from its checkpoint
DDP_DIR=$LOG/pretrain_ddp
run_step ddp 120 bash -c "$PY -m torch.distributed.run --standalone --nproc_per_node=1 tools/pretrain.py output_dir=$DDP_DIR \
  device=$DEVICE model.backbone=resnet18 model.img_size=[64,64] data.builtin_images=128 data.num_workers=2 \
  data.batch_size=16 train.epochs=2 train.amp=auto log.progress=false && test -f $DDP_DIR/last.pth && \
  $PY -m torch.distributed.run --standalone --nproc_per_node=1 tools/pretrain.py output_dir=$DDP_DIR device=$DEVICE \
  model.backbone=resnet18 model.img_size=[64,64] data.builtin_images=128 data.num_workers=2 \
  data.batch_size=16 train.epochs=3 train.amp=auto log.progress=false resume=auto"

# 4. per-op and backbone benchmarks on the GPU (tables into $LOG/*.md)
run_bench bench_ops 60 tools/benchmark_sparse_ops.py --device $DEVICE
run_bench bench_backbone 60 tools/benchmark_backbone.py --device $DEVICE

echo; echo "== gpu_check summary ($(( SECONDS - START ))s; logs in $LOG)"
printf '%s\n' "${SUMMARY[@]}" | tee "$LOG/SUMMARY.txt"
for results in "$LOG/autotune/results.json" "$LOG/checks/results.json"; do
  [[ -f "$results" ]] && $PY -c "import json; [print(f\"  {r['status']:5s} {r['check']}: {r['detail']}\") for r in json.load(open('$results'))]"
done
grep -q '^FAIL' "$LOG/SUMMARY.txt" && exit 1
exit 0
