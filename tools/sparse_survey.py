#!/usr/bin/env python
"""Survey timm convnets on the sparse engine: MAC shares (sparse kernels / dense / exact fallback) and,
with --check, the distance of the sparse twin to the dense-masked twin (train mode, float64).

    python tools/sparse_survey.py --models resnet50d,efficientnet_b0            # MAC shares at 224 px
    python tools/sparse_survey.py --models regnetx_002 --check --size 64x96      # equivalence, float64
"""
from __future__ import annotations

import argparse
import time

import torch

from sparse_mim.sparse import functional as SF
from sparse_mim.sparse.survey import compare_with_dense_masked, mac_shares, random_patch_mask, timm_trunk


def _size(text: str) -> tuple[int, int]:
    h, _, w = text.partition("x")
    return int(h), int(w or h)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", required=True, help="comma-separated timm model names")
    parser.add_argument("--size", type=_size, default=(224, 224), help="H or HxW, multiples of 32")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--check", action="store_true", help="compare with the dense-masked twin (float64)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--conv-backend", default="gather", help="conv path mode (see docs/autotune.md)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    SF.set_conv_backend(args.conv_backend)
    (H, W), B = args.size, args.batch
    if H % 32 or W % 32:
        parser.error(f"--size {H}x{W}: sides must be multiples of 32")
    visible = random_patch_mask(B, H // 32, W // 32, args.mask_ratio)
    dtype = torch.float64 if args.check else torch.float32
    print(f"# batch {B}, {H}x{W}, mask ratio {args.mask_ratio} ({int(visible[0].sum())} of {visible[0].numel()} "
          f"patches visible), {dtype}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    if args.check:
        print("| model | output | input grad | param grads (own max, floor 1e-8) | param grads (model max) | "
              "BN buffers (largest) | fallback ops |")
        print("|---|---|---|---|---|---|---|")
    else:
        print("| model | MACs (G) | sparse kernels | dense (pooled SE vectors) | exact fallback | fallback ops |")
        print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = timm_trunk(name, dtype)
        images = torch.randn(B, 3, H, W, dtype=dtype)
        if args.check:
            r = compare_with_dense_masked(model.train(), images, visible)
            ops = ", ".join(sorted({row["op"] for row in r["report"].fallback_rows()})) or "-"
            print(f"| {name} | {r['output']:.1e} | {r['input_grad']:.1e} | {r['param_grad']:.1e} | "
                  f"{r['param_grad_vs_largest']:.1e} | {r['buffers_vs_largest']:.1e} | {ops} |", flush=True)
        else:
            rep = mac_shares(model, images, visible)
            t = max(rep.total_macs, 1)
            ops = ", ".join(sorted({row["op"] for row in rep.fallback_rows()})) or "-"
            print(f"| {name} | {t / 1e9:.2f} | {rep.macs('sparse') / t:.1%} | {rep.macs('dense') / t:.2%} | "
                  f"{rep.macs('fallback') / t:.2%} | {ops} |", flush=True)


if __name__ == "__main__":
    main()
