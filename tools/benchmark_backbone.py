"""Benchmark sparse backbones against SparK's dense-masked simulation of the same weights.

Per model: share of the forward multiply-adds on sparse kernels, fwd+bwd time of a
training step (median of --repeats after a warm-up, both twins interleaved in this
process) and peak memory of one step (RSS high-water-mark growth on CPU). The logic
is `sparse_mim.backbones.benchmark`; see docs/backbones.md for the measured table.

    python tools/benchmark_backbone.py                                   # every family, 128 px, batch 4
    python tools/benchmark_backbone.py --models resnet50 convnext_small --input-size 224 --batch-size 16
"""
from __future__ import annotations

import argparse
import sys

import torch

from sparse_mim.backbones.benchmark import FAMILIES, TABLE_HEADER, format_row, run_benchmark


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=FAMILIES, help="registered or timm model names")
    p.add_argument("--input-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--mask-ratio", type=float, default=0.6)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per variant (after one warm-up)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# backbone fwd+bwd, train mode, {args.input_size}px, batch {args.batch_size}, mask ratio "
          f"{args.mask_ratio}, device {args.device}, {args.threads} threads, torch {torch.__version__}")
    print(f"# time: median of {args.repeats} runs after 1 warm-up, same process; MAC share: one forward; peak "
          "memory: " + ("CUDA max_memory_allocated growth" if args.device.startswith("cuda") else
                        "RSS high-water-mark growth of one step after the timed runs, same process"))
    print(TABLE_HEADER, flush=True)
    run_benchmark(args.models, args.input_size, args.batch_size, args.mask_ratio, args.repeats, args.device,
                  memory=not args.no_memory, on_row=lambda r: print(format_row(r), flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
