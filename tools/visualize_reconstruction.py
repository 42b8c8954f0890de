#!/usr/bin/env python
"""Reconstructions from a SparK checkpoint: (masked input | reconstruction | original), one image per row.

Reads this project's training checkpoints (a dict with ``model`` and ``config``)
and the official release files (``*_withdecoder_1kpretrained_spark_style.pth``,
a dict with ``module``); the backbone, input size, mask ratio and decoder width
come from the checkpoint where it records them, else from the options.

    python tools/visualize_reconstruction.py CHECKPOINT img1.jpg img2.jpg folder/ --out grid.png \
        [--backbone resnet50] [--input-size 224 | --input-size 224 320] [--mask-ratio 0.6] [--seed 0]
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message=r"`torch.cuda.amp.custom_(fwd|bwd)", category=FutureWarning)

import torch  # noqa: E402

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def find_in_config(config, names):
    """First value stored under any of ``names`` in a nested config dict (depth-first), or None."""
    if not isinstance(config, dict):
        return None
    for name in names:
        if name in config and not isinstance(config[name], dict):
            return config[name]
    for value in config.values():
        found = find_in_config(value, names)
        if found is not None:
            return found
    return None


def checkpoint_settings(checkpoint: dict) -> dict:
    """Backbone / input size / mask ratio / decoder width recorded in a checkpoint (None where absent)."""
    if "module" in checkpoint:  # official release file
        config = checkpoint["module"].get("config", {}) if isinstance(checkpoint["module"], dict) else {}
        return {
            "backbone": checkpoint.get("arch"),
            "input_size": checkpoint.get("input_size") or config.get("sparse_encoder.input_size"),
            "mask_ratio": config.get("mask_ratio"),
            "decoder_width": config.get("dense_decoder.width"),
            "densify_norm": config.get("densify_norm_str"),
        }
    config = checkpoint.get("config", {})
    backbone = find_in_config(config, ("backbone", "backbone_name", "arch"))
    if isinstance(backbone, dict):
        backbone = backbone.get("name")
    return {
        "backbone": backbone,
        "input_size": find_in_config(config, ("input_size", "img_size", "image_size")),
        "mask_ratio": find_in_config(config, ("mask_ratio",)),
        "decoder_width": find_in_config(config, ("decoder_width",)),
        "densify_norm": find_in_config(config, ("densify_norm",)),
    }


def list_images(paths):
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                            if f.lower().endswith(IMAGE_SUFFIXES))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise SystemExit(f"error: image path {path!r} does not exist")
    if not files:
        raise SystemExit(f"error: no images ({', '.join(IMAGE_SUFFIXES)}) found in {paths}")
    return files


def load_images(files, size, mean, std):
    """Resize the shorter side (bicubic), centre-crop to ``size`` (H, W), normalise."""
    from PIL import Image
    from torchvision.transforms import v2 as T
    transform = T.Compose([T.ToImage(), T.Resize(min(size), interpolation=T.InterpolationMode.BICUBIC),
                           T.CenterCrop(size), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])
    batch = []
    for f in files:
        with Image.open(f) as im:
            batch.append(transform(im.convert("RGB")))
    return torch.stack(batch)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="training checkpoint (.pth with 'model') or official *_withdecoder_* file")
    p.add_argument("images", nargs="+", help="image files and/or folders")
    p.add_argument("--out", default="reconstruction.png", help="output image (PNG)")
    p.add_argument("--backbone", default=None, help="backbone name if the checkpoint does not record it")
    p.add_argument("--input-size", type=int, nargs="+", default=None, help="H [W], multiples of 32")
    p.add_argument("--mask-ratio", type=float, default=None, help="default: the checkpoint's, else 0.6")
    p.add_argument("--decoder-width", type=int, default=None, help="default: the checkpoint's, else 768")
    p.add_argument("--seed", type=int, default=0, help="seed of the random masks")
    p.add_argument("--dense", action="store_true", help="run the dense-masked reference encoder instead")
    p.add_argument("--device", default="cpu")
    p.add_argument("--mean", type=float, nargs=3, default=(0.485, 0.456, 0.406))
    p.add_argument("--std", type=float, nargs=3, default=(0.229, 0.224, 0.225))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from sparse_mim.spark import SparK, load_spark_checkpoint
    from sparse_mim.visualize import save_grid

    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        raise SystemExit(f"error: {args.checkpoint} is not a checkpoint dict")
    found = checkpoint_settings(checkpoint)
    backbone = args.backbone or found["backbone"]
    if not backbone:
        raise SystemExit("error: the checkpoint does not record its backbone; pass --backbone NAME "
                         "(see sparse_mim.list_backbones())")
    if args.backbone and found["backbone"] and args.backbone != found["backbone"]:
        print(f"warning: --backbone {args.backbone} overrides the checkpoint's {found['backbone']}", file=sys.stderr)
    size = args.input_size or found["input_size"] or 224
    size = tuple(size) if isinstance(size, (list, tuple)) else (int(size), int(size))
    size = (size[0], size[0]) if len(size) == 1 else size
    mask_ratio = args.mask_ratio if args.mask_ratio is not None else (found["mask_ratio"] or 0.6)
    width = args.decoder_width or found["decoder_width"] or 768

    model = SparK(backbone, input_size=size, mask_ratio=mask_ratio, decoder_width=width,
                  densify_norm=found["densify_norm"], sparse=not args.dense)
    try:
        report = load_spark_checkpoint(model, checkpoint)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    model.to(args.device).eval()

    files = list_images(args.images)
    images = load_images(files, size, args.mean, args.std).to(args.device)
    generator = torch.Generator().manual_seed(args.seed)
    grid = model.reconstruction_grid(images, mean=args.mean, std=args.std, generator=generator)
    save_grid(grid, args.out)
    print(f"{report['format']}: {backbone} {size[0]}x{size[1]}, mask ratio {mask_ratio}, {len(files)} images "
          f"-> {args.out} (rows: masked input | reconstruction | original)")
    return grid


if __name__ == "__main__":
    main()
