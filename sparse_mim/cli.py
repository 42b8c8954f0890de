"""Command-line entry points of the pre-training half: parse arguments, call the library, return a status.

``pretrain`` / ``export`` / ``visualize`` are the console scripts ``spark-pretrain`` /
``spark-export`` / ``spark-visualize`` and what ``tools/pretrain.py``,
``tools/export_backbone.py`` and ``tools/visualize_reconstruction.py`` call. Errors come
back as one line (``--debug`` shows the traceback); exit status 0 on success, 1 on an
error, 2 on a usage / config error, 75 when a run was pre-empted after writing its
checkpoint (a batch script requeues on it; see docs/slurm_pretrain.sh).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

__all__ = ["pretrain", "export", "visualize"]

PRETRAIN_EPILOG = """examples:
  spark-pretrain                                                 # 2-minute CPU demo on generated images
  spark-pretrain -c configs/pretrain/resnet50.yaml data.root=/data/imagenet/train
  torchrun --nproc_per_node 8 tools/pretrain.py -c configs/pretrain/convnext_small.yaml data.root=/data/in1k
  spark-pretrain -c configs/pretrain/resnet50.yaml data.root=... output_dir=runs/r50 resume=auto
  spark-pretrain train.epochs=1 data.batch_size=8 --print-config

exit status: 0 done, 1 error, 2 bad config, 75 pre-empted (SIGTERM / SIGUSR1) after writing last.pth,
130 stopped by Ctrl-C after writing last.pth (a second Ctrl-C aborts at once)"""


def _pretrain_main(argv: list[str]) -> int:
    from .train import DEFAULTS, pretrain as run, validate_config
    from .utils.config import config_arg_parser, parse_config
    from .utils.preemption import stop_exit_code
    parser = config_arg_parser("SparK pre-training (sparse masked image modelling for convnets).",
                               PRETRAIN_EPILOG, prog="spark-pretrain")
    cfg, _ = parse_config(DEFAULTS, argv, parser=parser, validate=validate_config)
    summary = run(cfg)
    return stop_exit_code(summary.get("stop_signal")) if summary.get("preempted") else 0


def _export_main(argv: list[str]) -> int:
    from .export import export_from_checkpoint
    p = argparse.ArgumentParser(prog="spark-export", description=(
        "Export the encoder of a SparK pre-training checkpoint as a plain backbone state dict (dense names, "
        "torch layout; loads strict=True into the torchvision / timm model)."), epilog=(
        "example:\n  spark-export outputs/pretrain_demo/last.pth resnet18_spark.pth"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="pre-training checkpoint (last.pth or checkpoint-*.pth)")
    p.add_argument("out", help="output .pth file (backbone state_dict)")
    p.add_argument("--no-verify", action="store_true", help="skip the strict load into the dense twin")
    args = p.parse_args(argv)
    report = export_from_checkpoint(args.checkpoint, args.out, verify=not args.no_verify)
    step = f" (step {report['step']})" if report["step"] is not None else ""
    print(f"wrote {report['path']}: {report['backbone']} encoder{step}, {report['tensors']} tensors"
          + (", verified strict=True against the dense model" if report["verified"] else ""))
    return 0


def _visualize_main(argv: list[str]) -> int:
    from .visualize import visualize_checkpoint
    p = argparse.ArgumentParser(prog="spark-visualize", description=(
        "Reconstructions from a SparK checkpoint: (masked input | reconstruction | original), one image per row. "
        "The model (backbone, input size, mask ratio, decoder width) comes from the checkpoint itself."), epilog=(
        "example:\n  spark-visualize outputs/pretrain_demo/last.pth photo.jpg folder/ --out grid.png"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="SparK checkpoint: ours (last.pth) or an official *_withdecoder_* file")
    p.add_argument("images", nargs="+", help="image files and/or folders")
    p.add_argument("--out", default="reconstruction.png", help="output image (PNG)")
    p.add_argument("--img-size", type=int, nargs="+", default=None, help="H [W], multiples of 32 (default: the "
                   "checkpoint's)")
    p.add_argument("--mask-ratio", type=float, default=None, help="default: the checkpoint's")
    p.add_argument("--seed", type=int, default=0, help="seed of the random masks")
    p.add_argument("--dense", action="store_true", help="run the dense-masked reference encoder instead")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.mask_ratio is not None and not 0.0 < args.mask_ratio < 1.0:
        p.error(f"--mask-ratio {args.mask_ratio}: expected a value in (0, 1)")
    from .utils.misc import to_pair
    size = None if args.img_size is None else to_pair(args.img_size, "--img-size")
    r = visualize_checkpoint(args.checkpoint, args.images, args.out, seed=args.seed, dense=args.dense,
                             device=args.device, mask_ratio=args.mask_ratio, img_size=size)
    print(f"{r['backbone']} {r['input_size'][0]}x{r['input_size'][1]}, mask ratio {r['mask_ratio']}, "
          f"{r['images']} images -> {r['path']} (rows: masked input | reconstruction | original)")
    return 0


def _run(fn, argv: Sequence[str] | None, prog: str) -> int:
    from .utils.cli import run_cli
    return run_cli(fn, argv, prog)


def pretrain(argv: Sequence[str] | None = None) -> int:
    """``spark-pretrain [-c RECIPE] [key=value ...]``; returns the exit status."""
    return _run(_pretrain_main, argv, "spark-pretrain")


def export(argv: Sequence[str] | None = None) -> int:
    """``spark-export CHECKPOINT OUT``; returns the exit status."""
    return _run(_export_main, argv, "spark-export")


def visualize(argv: Sequence[str] | None = None) -> int:
    """``spark-visualize CHECKPOINT IMAGES... --out grid.png``; returns the exit status."""
    return _run(_visualize_main, argv, "spark-visualize")


if __name__ == "__main__":  # python -m sparse_mim.cli: the pre-training trainer
    sys.exit(pretrain())
