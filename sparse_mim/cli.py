"""Command-line entry points of the pre-training half: parse arguments, call the library, return a status.

``pretrain`` / ``export`` / ``visualize`` are the console scripts ``spark-pretrain`` /
``spark-export`` / ``spark-visualize`` and what ``tools/pretrain.py``,
``tools/export_backbone.py`` and ``tools/visualize_reconstruction.py`` call. Errors come
back as one line (``--debug`` shows the traceback); exit status 0 on success, 1 on an
error, 2 on a usage / config error, 75 when a run was pre-empted after writing its
checkpoint (a batch script requeues on it; see docs/slurm_pretrain.sh).
"""
from __future__ import annotations

import sys
from typing import Sequence

from .utils.cli import command_parser

__all__ = ["pretrain", "export", "visualize", "knn"]

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
    p = command_parser("spark-export", (
        "Export the encoder of a SparK pre-training checkpoint as a plain backbone state dict (dense names, "
        "torch layout; loads strict=True into the torchvision / timm model)."), epilog=(
        "example:\n  spark-export outputs/pretrain_demo/last.pth resnet18_spark.pth"))
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
    p = command_parser("spark-visualize", (
        "Reconstructions from a SparK checkpoint: (masked input | reconstruction | original), one image per row. "
        "The model (backbone, input size, mask ratio, decoder width) comes from the checkpoint itself."), epilog=(
        "example:\n  spark-visualize outputs/pretrain_demo/last.pth photo.jpg folder/ --out grid.png"))
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


def _knn_main(argv: list[str]) -> int:
    from .knn import evaluate_checkpoint, format_result
    from .utils import distributed as dist_utils
    p = command_parser("spark-knn", (
        "Representation quality of a SparK encoder: DINO's weighted k-NN (cosine similarity of the L2-normalised, "
        "globally pooled last feature map; the k nearest reference images vote with weight exp(sim / T)) and "
        "optionally MAE's linear probe (BatchNorm + linear head on the frozen pooled features). Reads our "
        "checkpoints (last.pth, checkpoint-*.pth, backbone.pth) and official SparK release files."), epilog=(
        "examples:\n"
        "  spark-knn outputs/pretrain_demo/last.pth --train builtin\n"
        "  spark-knn runs/r50/last.pth --train /data/imagenet/train --val /data/imagenet/val --max-images 20000\n"
        "  spark-knn resnet50_withdecoder_1kpretrained_spark_style.pth --train /data/in100/train "
        "--val /data/in100/val --linear-probe 90\n"
        "  spark-knn resnet50_1kpretrained_timm_style.pth --backbone resnet50 --train ... --val ...\n"
        "  torchrun --nproc_per_node 8 tools/knn_eval.py runs/r50/last.pth --train ... --val ...\n\n"
        "ROOT: an ImageFolder tree (one sub-folder per class), a list file ('path label' lines) or builtin (the "
        "demo images labelled by kind)."))
    p.add_argument("checkpoint", help="ours (last.pth, checkpoint-*.pth, backbone.pth) or an official SparK file "
                   "(*_withdecoder_1kpretrained_spark_style.pth, *_1kpretrained_timm_style.pth)")
    p.add_argument("--train", required=True, metavar="ROOT", help="labelled reference (training) images")
    p.add_argument("--val", default="", metavar="ROOT", help="labelled validation images (default: hold out "
                   "--val-fraction of --train)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="held-out part of every class when --val is "
                   "not given (default 0.2)")
    p.add_argument("--backbone", default=None, help="architecture, for files that do not name it (backbone.pth, "
                   "*_timm_style.pth)")
    p.add_argument("--img-size", type=int, nargs="+", default=None, help="H [W], multiples of 32 (default: the "
                   "checkpoint's input size, else 224)")
    p.add_argument("--k", type=int, default=20, help="neighbours (default 20, as DINO)")
    p.add_argument("--temperature", type=float, default=0.07, help="vote temperature (default 0.07, as DINO)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward per process")
    p.add_argument("--max-images", type=int, default=0, help="at most this many reference and validation images "
                   "(evenly per class); 0 = all")
    p.add_argument("--linear-probe", type=int, default=0, metavar="EPOCHS", help="also train MAE's linear probe "
                   "for EPOCHS epochs on the frozen features and report its top-1")
    p.add_argument("--probe-lr", type=float, default=None, help="linear-probe lr (default 0.1 x batch / 256)")
    p.add_argument("--probe-batch-size", type=int, default=256, help="linear-probe batch (default 256)")
    p.add_argument("--random-init", action="store_true", help="evaluate a randomly initialised encoder of the "
                   "same architecture instead (the baseline)")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-init and the linear probe")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--num-workers", type=int, default=4, help="image loader processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for name, value, ok in (("--k", args.k, args.k > 0), ("--temperature", args.temperature, args.temperature > 0),
                            ("--batch-size", args.batch_size, args.batch_size > 0),
                            ("--max-images", args.max_images, args.max_images >= 0),
                            ("--linear-probe", args.linear_probe, args.linear_probe >= 0),
                            ("--val-fraction", args.val_fraction, 0 < args.val_fraction < 1)):
        if not ok:
            p.error(f"{name} {value}: out of range (see --help)")
    from .utils.misc import to_pair
    size = None if args.img_size is None else to_pair(args.img_size, "--img-size")
    try:
        r = evaluate_checkpoint(args.checkpoint, args.train, args.val, backbone=args.backbone, img_size=size,
                                batch_size=args.batch_size, k=args.k, temperature=args.temperature,
                                val_fraction=args.val_fraction, max_images=args.max_images,
                                linear_probe_epochs=args.linear_probe, probe_lr=args.probe_lr,
                                probe_batch_size=args.probe_batch_size, random_init=args.random_init,
                                device=args.device, num_workers=args.num_workers, seed=args.seed,
                                progress=not args.no_progress)
        if dist_utils.is_main_process():
            print(f"{args.checkpoint}: {r['backbone']} ({r['kind']}), {r['input_size'][0]}x{r['input_size'][1]}, "
                  f"{r['train_images']} reference / {r['val_images']} validation images, {r['classes']} classes"
                  + (f", {r['unreadable']} unreadable left out" if r["unreadable"] else "")
                  + f"; features {r['feature_seconds']:.1f} s")
            print(f"k-NN (k={r['knn']['k']}, T={args.temperature:g}): {format_result(r['knn'], '')}")
            if r["linear_probe"]:
                lp = r["linear_probe"]
                print(f"linear probe ({lp['epochs']} epochs): {format_result(lp, '')} (training top-1 "
                      f"{lp['train_top1']:.1f} %)")
    finally:
        dist_utils.cleanup()
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


def knn(argv: Sequence[str] | None = None) -> int:
    """``spark-knn CHECKPOINT --train ROOT [--val ROOT] [--linear-probe EPOCHS]``; returns the exit status."""
    return _run(_knn_main, argv, "spark-knn")


if __name__ == "__main__":  # python -m sparse_mim.cli: the pre-training trainer
    sys.exit(pretrain())
