#!/usr/bin/env bash
# Run the precision-sensitive tests (pytest -m precision) as CPUs without AVX-512 / bf16 instructions do.
#
#   bash tools/run_tests_restricted_isa.sh                  # SSE4.1, then AVX2
#   ISAS=avx2 bash tools/run_tests_restricted_isa.sh -x     # one instruction set; extra arguments go to pytest
#
# torch picks its vectorised kernels by ATEN_CPU_CAPABILITY and oneDNN its JIT kernels by ONEDNN_MAX_CPU_ISA;
# both can only lower what the CPU has. Before each run the script prints the instruction set each of them
# really uses, and stops if torch ignored the request (docs/testing.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
case "$(uname -m)" in
    x86_64|amd64) ;;
    *) echo "run_tests_restricted_isa.sh: SSE4.1 / AVX2 emulation is for x86-64 CPUs; nothing to do on $(uname -m)"; exit 0 ;;
esac
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
for isa in ${ISAS:-sse41 avx2}; do
    case "$isa" in
        sse41) aten=default; onednn=SSE41 ;;
        avx2) aten=avx2; onednn=AVX2 ;;
        *) echo "unknown instruction set '$isa' (use sse41 or avx2)" >&2; exit 2 ;;
    esac
    used=$(ATEN_CPU_CAPABILITY=$aten ONEDNN_MAX_CPU_ISA=$onednn ONEDNN_VERBOSE=1 "$PY" -c '
import torch
torch.nn.functional.conv2d(torch.randn(16, 8, 8, 8), torch.randn(8, 8, 3, 3))  # a oneDNN convolution
print("torch:", torch.backends.cpu.get_cpu_capability())' 2>&1 | sed -n 's/^onednn_verbose.*info,cpu,isa:\(.*\)$/oneDNN: \1/p; /^torch:/p' | tr '\n' ' ')
    echo "== precision tests as a $isa CPU (ATEN_CPU_CAPABILITY=$aten ONEDNN_MAX_CPU_ISA=$onednn): $used"
    want=$(echo "$aten" | tr a-z A-Z)
    case "$used" in
        *"torch: $want"*) ;;
        *) echo "torch did not take ATEN_CPU_CAPABILITY=$aten (got: $used)" >&2; exit 1 ;;
    esac
    ATEN_CPU_CAPABILITY=$aten ONEDNN_MAX_CPU_ISA=$onednn "$PY" -m pytest -q -m precision "$@"
done
