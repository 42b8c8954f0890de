#!/usr/bin/env python
"""MetaFormer speed: fp32 vs bf16 (vs fp16) and fused SDPA vs explicit attention, in one run.

Inference images/s, one training step (forward + backward + AdamW), activation memory,
and the logits of each precision against fp32; every configuration on the same model,
interleaved (see ``fgvc.benchmark``). On the CPU the clock is process CPU time.

    python tools/benchmark_fgvc.py                                   # MetaFormer-0/1, 224 and 384, fp32 + bf16
    python tools/benchmark_fgvc.py --models metaformer_0 --sizes 224 --threads 1 --attn sdpa
    python tools/benchmark_fgvc.py --device cuda --amp off bf16 fp16 # a GPU, all three precisions
"""
import argparse
import json
import sys

from fgvc.benchmark import AMP_SETTINGS, metaformer_benchmark


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="metaformer_0,metaformer_1", help="comma-separated registry names")
    p.add_argument("--sizes", default="224,384", help="comma-separated input sizes")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--meta-dims", default="4,3", help="meta groups ('' for image only)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--model-kwargs", default="{}", help='extra create_model kwargs as JSON, e.g. \'{"attn_depths": [2, 2]}\'')
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--amp", nargs="+", default=["off", "bf16"], choices=list(AMP_SETTINGS),
                   help="precisions to compare (off = fp32, the baseline of the 'vs fp32' columns)")
    p.add_argument("--attn", nargs="+", default=["sdpa", "explicit"], choices=["sdpa", "explicit"],
                   help="attention paths to compare")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--attn-repeats", type=int, default=6, help="timed repeats of the attention layer alone")
    p.add_argument("--no-attn-layer", action="store_true", help="skip the attention-layer-alone rows")
    p.add_argument("--no-train", action="store_true", help="skip the training-step measurement")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--clock", choices=["auto", "wall", "cpu"], default="auto",
                   help="auto: process CPU time on the CPU, wall time on CUDA")
    p.add_argument("--progress", action="store_true", help="print each timed run to stderr")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    metaformer_benchmark(
        models=args.models.split(","), sizes=[int(s) for s in args.sizes.split(",")], batch=args.batch,
        meta_dims=[int(d) for d in args.meta_dims.split(",") if d], num_classes=args.num_classes,
        model_kwargs=json.loads(args.model_kwargs), device=args.device, amp=args.amp, attn=args.attn,
        repeats=args.repeats, warmup=args.warmup, train=not args.no_train, attn_layer=not args.no_attn_layer,
        attn_repeats=args.attn_repeats, clock=args.clock,
        progress=(lambda line: print(line, file=sys.stderr, flush=True)) if args.progress else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
