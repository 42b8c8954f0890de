#!/usr/bin/env python
"""Benchmark every sparse op against its dense-masked twin at ResNet-50 / ConvNeXt shapes.

For each op: the sparse twin on a `SparseMap` vs the dense-masked baseline
(SparK's simulation: the dense op on the zero-filled map, output multiplied by
the mask; BatchNorm with visible-site statistics), measured in the same process,
interleaved, median of ``--repeats`` runs. Ops with more than one exact
implementation run once per conv mode (``--modes``, default autotune and table),
with the path each mode ran. Columns: forward and forward+backward times, their
ratio (sparse / dense-masked; < 1 is a gain), activation memory kept for
backward (CPU) or peak memory (CUDA), the autotuner's time on that op, and the
equivalence error. The autotuner's choices follow as a second table.

    python tools/benchmark_sparse_ops.py                      # batch 16, 224 px, mask ratio 0.6
    python tools/benchmark_sparse_ops.py --paths all          # also every forced path
    python tools/benchmark_sparse_ops.py --only conv3x3,dw7x7 --repeats 9
"""
from __future__ import annotations

import argparse
import warnings

import torch

from sparse_mim.benchmark import sparse_ops_benchmark
from sparse_mim.sparse import autotune


def main(argv=None):
    warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.custom_(fwd|bwd).*")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224, help="image side (multiple of 32)")
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", default=None, help="comma-separated op names (e.g. conv3x3,dw7x7)")
    parser.add_argument("--modes", nargs="+", default=["autotune", "table"], choices=autotune.MODES,
                        help="conv modes to compare (autotune, table, or a forced path)")
    parser.add_argument("--paths", default="modes", choices=("modes", "all"),
                        help="'all': also every forced implementation of each op")
    parser.add_argument("--clock", choices=["auto", "wall", "cpu"], default="auto",
                        help="process CPU time (robust on a shared machine) or wall; auto: cpu on the CPU")
    parser.add_argument("--autotune-cache", default="off",
                        help="autotune cache (directory or .json file; 'off': tune afresh, the default here)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    autotune.set_cache(args.autotune_cache)
    sparse_ops_benchmark(batch=args.batch, size=args.size, mask_ratio=args.mask_ratio, repeats=args.repeats,
                         device=args.device, only=args.only.split(",") if args.only else None, modes=args.modes,
                         all_paths=args.paths == "all", clock=args.clock)


if __name__ == "__main__":
    main()
