#!/usr/bin/env bash
# GPU check of sparse_mim on the lent GPU machine, in one go: numerical equivalence of the
# sparse engine on CUDA (spconv implicit GEMM and the torch paths) against the dense-masked
# simulation and the CPU, fp16 autocast + GradScaler, a one-process DDP pre-training run
# (torchrun), and the benchmarks on the GPU. Every step runs even if an earlier one failed;
# the end prints PASS / FAIL per step. Logs and tables go to $OUT/gpu_check/.
#
# Procedure (see README.md, "GPU check"):
#   here, once:   bash tools/gpu_check.sh prepare        # spconv cp312 wheels in two parts + pure-Python extras
#   device call 1 (starts the machine): carry [".gpu_wheels/part1"]
#                 command: bash .gpu_wheels/part1/install_on_device.sh 1
#   device call 2 (right after; the machine stays warm only briefly), timeout_s 540:
#                 carry [".gpu_wheels/part2", ".gpu_wheels/extra"]
#                 command: bash .gpu_wheels/part2/install_on_device.sh 2 && bash tools/gpu_check.sh
#
# Environment knobs: GPU_CHECK_BUDGET (seconds for all steps, default 420), GPU_CHECK_QUICK=1
# (small shapes), GPU_CHECK_DEVICE=cpu (dry run without a GPU), GPU_CHECK_STEPS="checks ddp bench_ops bench_backbone bench_pretrain bench_amp".
set -uo pipefail   # no -e: a failing step is recorded and the next one runs

cd "$(dirname "$0")/.."
ROOT=$PWD

if [[ "${1:-}" == "prepare" ]]; then
  set -ex
  bash ../shared/gpu/prepare_spconv_wheels.sh
  # Pure-Python (or cp312) wheels the device may lack; installed there only if the import fails.
  rm -rf .gpu_wheels/extra && mkdir -p .gpu_wheels/extra
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu_wheels/extra \
    timm==1.0.31 PyYAML==6.0.4 tqdm==4.70.1 einops==0.8.2
  du -sh .gpu_wheels/*
  exit 0
fi

OUT=${OUT:-$ROOT/gpu_check_out}
LOG=$OUT/gpu_check
mkdir -p "$LOG"
exec > >(tee -a "$LOG/gpu_check.log") 2>&1
BUDGET=${GPU_CHECK_BUDGET:-420}
STEPS=${GPU_CHECK_STEPS:-"checks ddp bench_ops bench_backbone bench_pretrain bench_amp"}
QUICK=${GPU_CHECK_QUICK:-0}
DEVICE=${GPU_CHECK_DEVICE:-cuda}   # cpu: dry-run of this script on a machine without a GPU
PY=${PYTHON:-python3}
export WANDB_MODE=disabled PYTHONUNBUFFERED=1
export PYTHONPATH="/tmp/site:/tmp/site_extra:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
START=$SECONDS
declare -a SUMMARY=()

echo "== gpu_check $(date -u +%FT%TZ) in $ROOT, output $LOG, budget ${BUDGET}s"
set -x
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
$PY -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" || true
{ set +x; } 2>/dev/null

# Fill in missing pure-Python packages from the carried wheels (never shadows what the machine has).
# timm also needs torchvision at import time: the env check reports it if the machine lacks it.
declare -A WHEEL_OF=([timm]=timm [yaml]=PyYAML [tqdm]=tqdm [einops]=einops)
for module in "${!WHEEL_OF[@]}"; do
  if ! $PY -c "import $module" 2>/dev/null; then
    whl=$(ls .gpu_wheels/extra/*.whl 2>/dev/null | grep -i "/${WHEEL_OF[$module]}-" | head -1)
    if [[ -n "$whl" ]]; then
      echo "installing $(basename "$whl") into /tmp/site_extra ($module is missing)"
      $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_extra "$whl" || true
    else
      echo "WARNING: python module $module is missing and no wheel was carried (.gpu_wheels/extra)"
    fi
  fi
done

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

quick_flag=""; BENCH="--batch 32 --steps 5 --warmup 2"
if (( QUICK )); then quick_flag="--quick"; BENCH="--backbones resnet18 --batch 2 --input-size 64 --steps 1 --warmup 0 --decoder-width 128"; fi

# 1. numerical checks: engine backends + backbones vs dense-masked and CPU, SparK, AMP
run_step checks 200 $PY tools/gpu_check.py --device $DEVICE --out "$LOG" $quick_flag

# 2. one-process DDP pre-training (torchrun), tiny config on built-in images, then resume from its checkpoint
DDP_DIR=$LOG/pretrain_ddp
run_step ddp 120 bash -c "$PY -m torch.distributed.run --standalone --nproc_per_node=1 tools/pretrain.py output_dir=$DDP_DIR \
  device=$DEVICE model.backbone=resnet18 model.img_size=[64,64] data.builtin_images=128 data.num_workers=2 \
  data.batch_size=16 train.epochs=2 train.amp=auto log.progress=false && test -f $DDP_DIR/last.pth && \
  $PY -m torch.distributed.run --standalone --nproc_per_node=1 tools/pretrain.py output_dir=$DDP_DIR device=$DEVICE \
  model.backbone=resnet18 model.img_size=[64,64] data.builtin_images=128 data.num_workers=2 \
  data.batch_size=16 train.epochs=3 train.amp=auto log.progress=false resume=auto"

# 3. benchmarks on the GPU (tables into $LOG/*.md)
run_bench bench_ops 60 tools/benchmark_sparse_ops.py --device $DEVICE
run_bench bench_backbone 60 tools/benchmark_backbone.py --device $DEVICE
run_bench bench_pretrain 120 tools/benchmark_pretrain.py --device $DEVICE $BENCH --flops
run_bench bench_amp 90 tools/benchmark_pretrain.py --device $DEVICE $BENCH --amp

echo; echo "== gpu_check summary ($(( SECONDS - START ))s; logs in $LOG)"
printf '%s\n' "${SUMMARY[@]}" | tee "$LOG/SUMMARY.txt"
[[ -f "$LOG/results.json" ]] && $PY -c "import json; [print(f\"  {r['status']:5s} {r['check']}: {r['detail']}\") for r in json.load(open('$LOG/results.json'))]"
grep -q '^FAIL' "$LOG/SUMMARY.txt" && exit 1
exit 0
