#!/usr/bin/env python
"""Numerical and speed checks of the sparse engine and SparK on a GPU (see docs/gpu.md).

Checks: env, backbone[<conv mode>] (sparse vs dense-masked and vs the CPU under every
conv mode), spark, amp (fp16 + GradScaler), autotune (the autotuner's choices and the
full-step ratio autotune / table / dense-masked under fp16 and bf16 autocast).

    python tools/gpu_check.py --out gpu_check_out             # on a CUDA machine
    python tools/gpu_check.py --device cpu --quick            # exercise the script without a GPU
    python tools/gpu_check.py --only env autotune             # just the autotuner's answer
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", message=r"`torch.cuda.amp.custom_(fwd|bwd)", category=FutureWarning)
    os.environ.setdefault("WANDB_MODE", "disabled")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="small models / shapes only (CPU self-test)")
    p.add_argument("--out", default=None, help="folder for results.json and autotune.md")
    from sparse_mim.gpu_check import CHECKS
    p.add_argument("--only", nargs="*", default=None, choices=list(CHECKS), help="run only these checks")
    args = p.parse_args(argv)
    from sparse_mim.gpu_check import run_checks
    return run_checks(args.device, quick=args.quick, out=args.out, only=args.only)


if __name__ == "__main__":
    sys.exit(main())
