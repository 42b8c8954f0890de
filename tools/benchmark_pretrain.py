#!/usr/bin/env python
"""Full SparK pre-training steps: the sparse encoder under each conv mode vs the dense-masked simulation.

For each backbone: forward, backward and a LAMB optimizer step (timm) of
``SparK(backbone, sparse=True)`` under each conv mode (``autotune``: every exact
implementation timed once per configuration, the fastest kept; ``table``: the
fixed rules; or a forced path) and of its dense-masked twin (``dense``), same
weights, images and masks; the models' steps alternate so that load from other
processes hits all alike; the table shows medians. ``--amp`` adds a block of rows
per precision (``off``, ``bf16``, ``fp16``; the autotuner tunes under each).

The step is cut into its parts by detaching at the two boundaries (encoder ->
densify -> decoder) and running the three backward passes one after another:
the same work as ``loss.backward()``, but each part timed on its own. Columns:
forward / backward time of each part, optimizer, the whole step, the step ratio
against dense-masked, the first step (autotune: tuning included), activation
memory (bytes autograd saves for backward) per part; peak memory on CUDA. Below
the table: the tuning overhead and after how many steps it is paid back, the
autotuner's choice per scale, and the time bound of a sparse encoder.

    python tools/benchmark_pretrain.py                                  # R50 + ConvNeXt-S, batch 16, 224, mask .6
    python tools/benchmark_pretrain.py --backbones resnet50 --batch 8 --steps 3 --flops
    python tools/benchmark_pretrain.py --device cuda --amp fp16 bf16    # GPU, both autocast dtypes
"""
from __future__ import annotations

import argparse
import warnings

import torch

from sparse_mim.benchmark import AMP_DTYPES, pretrain_benchmark
from sparse_mim.sparse import autotune


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=["resnet50", "convnext_small"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--input-size", type=int, nargs="+", default=[224], help="H [W]")
    p.add_argument("--mask-ratio", type=float, default=0.6)
    p.add_argument("--decoder-width", type=int, default=768)
    p.add_argument("--steps", type=int, default=3, help="timed steps per model (after --warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--amp", nargs="*", default=None, choices=list(AMP_DTYPES),
                   help="precisions to run, each a block of rows (default off; '--amp' alone: fp16 with a "
                        "GradScaler)")
    p.add_argument("--modes", nargs="+", default=["autotune", "table", "dense"],
                   choices=list(autotune.MODES) + ["dense"],
                   help="conv modes of the sparse model, and dense = the dense-masked twin (the baseline)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="dense convs (decoder, densify projections, dense-masked backbone) in channels_last memory; "
                        "default: what training uses on the device (sparse_mim.utils.device_perf)")
    p.add_argument("--flops", action="store_true", help="count the dense model's MACs per image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clock", choices=["auto", "wall", "cpu"], default="auto",
                   help="wall time, or process CPU time (all threads; robust to other processes on a shared "
                        "machine); auto: cpu on the CPU, wall on CUDA")
    p.add_argument("--autotune-cache", default="off",
                   help="autotune cache (directory or .json file); default off, so the tuning cost is measured")
    return p.parse_args(argv)


def main(argv=None):
    warnings.filterwarnings("ignore", message=r"`torch.cuda.amp.custom_(fwd|bwd)", category=FutureWarning)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    amp = ["off"] if args.amp is None else (args.amp or ["fp16"])
    cache = False if args.autotune_cache.lower() in ("off", "none", "0", "false") else args.autotune_cache
    pretrain_benchmark(backbones=args.backbones, batch=args.batch, input_size=args.input_size,
                       mask_ratio=args.mask_ratio, decoder_width=args.decoder_width, steps=args.steps,
                       warmup=args.warmup, device=args.device, modes=args.modes, amp=amp,
                       channels_last=args.channels_last, flops=args.flops, seed=args.seed, clock=args.clock,
                       autotune_cache=cache)


if __name__ == "__main__":
    main()
