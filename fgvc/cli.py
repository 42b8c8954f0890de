"""Command-line entry points of the fgvc half (console scripts ``fgvc-*`` and ``tools/*_fgvc.py``).

Every fgvc command's arguments are parsed here (the library modules take keyword arguments):
the config-driven commands (train, eval) follow ``[POSITIONALS] [-c CONFIG.yaml] [key=value ...]``, parsed
with argparse; ``--help`` lists every config key with its default and meaning;
``--print-config`` shows the resolved config; ``--debug`` shows a traceback instead of the
one-line error. Each function takes ``argv`` (default ``sys.argv[1:]``) and returns the exit
status; the library raises, only :func:`sparse_mim.utils.cli.run_cli` turns errors into
statuses (2: a usage / config error, 1: any other error, 75: stopped by a pre-emption
signal, requeue and continue with ``resume=auto``).
"""
from __future__ import annotations

import sys
from typing import List, Optional, Sequence

from sparse_mim.utils.cli import run_cli

__all__ = ["train", "evaluate", "predict", "export", "average", "prepare_text", "TRAIN_DESCRIPTION", "EVAL_DESCRIPTION",
           "PREDICT_DESCRIPTION", "EXPORT_DESCRIPTION", "AVERAGE_DESCRIPTION"]

TRAIN_DESCRIPTION = """Fine-tune MetaFormer (or a convnet + meta-token hybrid) on a fine-grained dataset with meta.

  fgvc-train                                                     # the offline CPU demo (fgvc/demo.yaml)
  fgvc-train -c configs/fgvc/tiny_cpu.yaml data.dataset=cub data.root=/data/CUB_200_2011
  fgvc-train -c configs/fgvc/cub_metaformer0_224.yaml data.root=/data/CUB_200_2011
  torchrun --nproc_per_node 8 tools/train_fgvc.py -c configs/fgvc/inat2021_metaformer2_384.yaml data.root=/data/inat21
  fgvc-train -c configs/fgvc/cub_metaformer0_224.yaml data.root=/data/CUB_200_2011 resume=auto   # continue

Without -c the demo recipe is used, unless data.dataset is given: then that dataset's shipped
defaults (configs/fgvc/_base_/<dataset>.yaml) apply. An output_dir that already holds a run is
never overwritten: continue it with resume=auto or choose another output_dir."""

EVAL_DESCRIPTION = """Evaluate a fine-grained classifier with and without its meta-information.

  fgvc-eval outputs/fgvc_demo/best.pth
  fgvc-eval outputs/cub_metaformer0_224/last.pth data.root=/mnt/cub eval.split=val
  fgvc-eval metafg_2_inat21_384.pth -c configs/fgvc/inat2021_metaformer2_384.yaml data.root=/data/inat21
  fgvc-eval outputs/fgvc_demo/best.pth --tta hflip            # test-time augmentation (hflip | multicrop)

Our checkpoints carry their training config, classes and meta layout (only the test split is
read); an official MetaFormer file needs its recipe with -c. Results go to
<checkpoint folder>/eval_<checkpoint name>_<split>/ (summary.json, predictions.csv,
per_class.csv, top_confusions.csv, confusion.png); summary.json also has many / medium /
few-shot top-1 (from the training class counts the checkpoint stores)."""


PREDICT_DESCRIPTION = """Classify photos with a trained fgvc checkpoint, with their date / place / attributes when known.

  fgvc-predict outputs/fgvc_demo/best.pth photo.jpg --date 2021-06-14T09:30 --lat 48.85 --lon 2.35
  fgvc-predict outputs/fgvc_demo/best.pth photos/ --meta-csv photos/meta.csv --out predictions.csv
  fgvc-predict outputs/cub_metaformer0_224/best.pth bird.jpg --attributes bird_attributes.txt --topk 3

Prints the top-k class names with probabilities per image and the meta each prediction used,
and writes them to a CSV. Folders are searched recursively and classified in batches. Meta not
given (or a group the model has that no input fills) is fed as absent, as in training's meta
dropout. --date/--lat/--lon/--attributes apply to every image; --meta-csv gives per-image values
(columns: path or image, date, lat, lon, attributes; a custom dataset's own meta columns too) and
wins over them."""

EXPORT_DESCRIPTION = """Export a trained fgvc checkpoint to a deployable format.

  fgvc-export outputs/fgvc_demo/best.pth                              # -> outputs/fgvc_demo/best.pt2 + best.json
  fgvc-export outputs/fgvc_demo/best.pth --out deploy/birds.pt2 --format pt2 onnx

pt2: a torch.export program (load with fgvc.export.load_program(path); inputs images
[B,3,H,W], meta [B,D], meta_present [B,G] bool; dynamic batch). onnx: the same graph as ONNX
(needs the onnx and onnxscript packages). Each export is compared with the eager model and the
largest logit difference printed. The .json next to it lists the classes, meta groups and the
input preprocessing."""

AVERAGE_DESCRIPTION = """Average the weights of several fgvc checkpoints of one model (uniform average).

  fgvc-average outputs/cub/checkpoint-*.pth --out outputs/cub/average.pth
  fgvc-average outputs/cub/checkpoint-*.pth --ema --out outputs/cub/average_ema.pth
  fgvc-eval outputs/cub/average.pth

The files must hold the same model, classes and meta layout (the copies a run keeps with
checkpoint.keep_every_steps, or best.pth of runs of one recipe). The result is an ordinary
checkpoint for fgvc-eval, fgvc-predict and fgvc-export."""


def _train_argv(argv: Sequence[str]) -> List[str]:
    """No recipe given: the demo, or the chosen dataset's shipped defaults (never the demo for a real dataset)."""
    from sparse_mim.utils.config import ConfigError, split_argv
    argv = list(argv)
    if any(a in ("-c", "--config", "-h", "--help") or a.startswith("--config=") for a in argv):
        return argv
    _, overrides = split_argv(argv, ["data.dataset"])
    chosen = [o.split("=", 1)[1].strip() for o in overrides if o.split("=", 1)[0].strip().lstrip("-") == "data.dataset"]
    if not chosen:
        if any(o.split("=", 1)[0].strip().lstrip("-") in ("data.root", "data.train_csv") for o in overrides):
            raise ConfigError("data.root given without a recipe or data.dataset: pass -c configs/fgvc/<recipe>.yaml "
                              "or data.dataset=cub|nabirds|inat2017|inat2018|inat2021|custom")
        return ["-c", "fgvc/demo.yaml"] + argv
    dataset = chosen[-1]
    if dataset == "custom":
        return argv  # the code defaults (the official recipe) with the user's custom CSVs
    return ["-c", f"fgvc/_base_/{dataset}.yaml"] + argv


def _train(argv: List[str]) -> int:
    from sparse_mim.utils.config import config_arg_parser, parse_config
    from sparse_mim.utils.preemption import stop_exit_code
    from .train import DEFAULTS, train as run_train, validate_config
    parser = config_arg_parser(TRAIN_DESCRIPTION, prog="fgvc-train")
    cfg, _ = parse_config(DEFAULTS, _train_argv(argv), parser=parser, validate=validate_config)
    summary = run_train(cfg)
    if summary.get("stopped") and summary.get("preempted"):
        return stop_exit_code(summary["stop_signal"])  # 130 after Ctrl-C, 75 (requeue) after SIGTERM / SIGUSR1
    return 0


def _evaluate(argv: List[str]) -> int:
    from sparse_mim.utils.config import config_arg_parser, config_help, split_argv, flatten, split_schema
    from .evaluate import eval_schema, evaluate_checkpoint
    schema = eval_schema()
    parser = config_arg_parser(EVAL_DESCRIPTION, prog="fgvc-eval")
    parser.add_argument("checkpoint", help="a .pth file: best.pth / last.pth of a run, or an official MetaFormer file")
    parser.epilog = "config keys (key=value; defaults come from the checkpoint's stored config):\n" + \
        config_help(schema)
    parser.add_argument("--tta", choices=("none", "hflip", "multicrop"),
                        help="test-time augmentation (same as eval.tta=...): hflip or multicrop, probabilities averaged")
    own, overrides = split_argv(argv, flatten(split_schema(schema)[0]).keys())
    args = parser.parse_args(own)
    if args.tta:
        overrides = list(overrides) + [f"eval.tta={args.tta}"]
    if args.print_config:
        import yaml
        from sparse_mim.utils.checkpoint import load_checkpoint
        from fgvc.models.metaformer import OFFICIAL_CONFIG_GLOBALS
        from .evaluate import load_eval_config
        ckpt = load_checkpoint(args.checkpoint, allowed_globals=OFFICIAL_CONFIG_GLOBALS)
        cfg, _ = load_eval_config(args.checkpoint, ckpt, args.config, overrides)
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    evaluate_checkpoint(args.checkpoint, args.config, overrides)
    return 0


def _predict_parser():
    from sparse_mim.utils.cli import command_parser
    p = command_parser("fgvc-predict", PREDICT_DESCRIPTION)
    p.add_argument("checkpoint", help="best.pth / last.pth of an fgvc training run")
    p.add_argument("images", nargs="+", help="image files and/or folders")
    p.add_argument("--date", help="observation date YYYY-MM-DD[THH:MM] (month and hour are used)")
    p.add_argument("--lat", type=float, help="latitude in degrees (-90..90); needs --lon")
    p.add_argument("--lon", type=float, help="longitude in degrees (-180..180); needs --lat")
    p.add_argument("--attributes", help="numeric meta file: one number per value (e.g. CUB's 312 attributes, "
                                        "0/1), or lines 'attribute_id is_present', or a .npy")
    p.add_argument("--text", help="caption embedding .npy ([captions, tokens, dim]) for a text-meta model")
    p.add_argument("--meta-csv", help="per-image meta CSV (see above)")
    p.add_argument("--topk", type=int, default=5, help="classes to report per image (default 5)")
    p.add_argument("--out", default="predictions.csv", help="CSV written with the results (default predictions.csv; "
                                                            "'' = none)")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
                   help="mixed precision (auto: bf16 where the hardware has it, else fp32)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="default: CUDA when present")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--tta", default="none", choices=("none", "hflip", "multicrop"),
                   help="test-time augmentation: hflip (image + mirror) or multicrop (centre + 4 corner crops and "
                        "their mirrors, 10 views); probabilities averaged (default none)")
    p.add_argument("--quiet", action="store_true", help="only the summary line (the CSV has everything)")
    return p


def _predict(argv: List[str], log=print) -> int:
    """``fgvc-predict`` (see ``PREDICT_DESCRIPTION``): 1 if an image was unreadable."""
    import torch
    from sparse_mim.utils.cli import UsageError
    from .predict import predict_files
    args = _predict_parser().parse_args(list(argv))
    if args.topk < 1:
        raise UsageError(f"--topk must be >= 1, got {args.topk}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if (args.lat is None) != (args.lon is None):
        raise UsageError("--lat and --lon go together: give both (or neither)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device cpu)")
    preds = predict_files(args.checkpoint, args.images, date=args.date, lat=args.lat, lon=args.lon,
                          attributes=args.attributes, text=args.text, meta_csv=args.meta_csv, topk=args.topk,
                          out=args.out, device=None if args.device == "auto" else torch.device(args.device),
                          amp=args.amp, batch_size=args.batch_size, tta=args.tta, quiet=args.quiet, log=log)
    return 1 if any(p.error for p in preds) else 0


def _export(argv: List[str], log=print) -> int:
    from sparse_mim.utils.cli import command_parser
    from .export import export_checkpoint
    p = command_parser("fgvc-export", EXPORT_DESCRIPTION)
    p.add_argument("checkpoint", help="best.pth / last.pth of an fgvc training run")
    p.add_argument("--out", default="", help="output path (.pt2); default: next to the checkpoint, same name")
    p.add_argument("--format", nargs="+", default=["pt2"], choices=("pt2", "onnx"), help="pt2 (default) and/or onnx")
    p.add_argument("--tta", default="none", choices=("none", "hflip", "multicrop"),
                   help="export with test-time augmentation inside the graph (see fgvc-eval --tta)")
    p.add_argument("--batch", type=int, default=2, help="example batch size used for tracing (the batch stays dynamic)")
    args = p.parse_args(list(argv))
    export_checkpoint(args.checkpoint, args.out, args.format, args.batch, log=log, tta=args.tta)
    return 0


def _average(argv: List[str], log=print) -> int:
    from sparse_mim.utils.cli import command_parser
    from .average import average_checkpoints
    p = command_parser("fgvc-average", AVERAGE_DESCRIPTION)
    p.add_argument("checkpoints", nargs="+", help="two or more .pth files of one model")
    p.add_argument("--out", required=True, help="the averaged checkpoint to write")
    p.add_argument("--ema", action="store_true", help="average the files' EMA weights (model_ema)")
    args = p.parse_args(list(argv))
    average_checkpoints(args.checkpoints, args.out, use_ema=args.ema, log=log)
    return 0


def _prepare_text(argv: List[str]) -> dict:
    import torch
    from sparse_mim.utils.cli import command_parser
    from .data import text_meta
    p = command_parser("fgvc-prepare-text", text_meta.__doc__)
    p.add_argument("--root", required=True, help="CUB_200_2011 folder (with images.txt)")
    p.add_argument("--bert", default="", help="local bert-base-uncased folder")
    p.add_argument("--captions", default=None, help="text_c10 folder (default <root>/text_c10)")
    p.add_argument("--out", default=None, help="output folder (default <root>/text_emb)")
    p.add_argument("--num-captions", type=int, default=10)
    p.add_argument("--max-len", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(list(argv))
    embed = text_meta.load_bert(args.bert, args.device)
    return text_meta.prepare_text_meta(args.root, embed, args.captions, args.out, args.num_captions, args.max_len)


def train(argv: Optional[Sequence[str]] = None) -> int:
    """``fgvc-train [-c CONFIG] [key=value ...]``; returns the exit status."""
    return run_cli(_train, argv, prog="fgvc-train")


def evaluate(argv: Optional[Sequence[str]] = None) -> int:
    """``fgvc-eval CHECKPOINT [-c CONFIG] [key=value ...]``; returns the exit status."""
    return run_cli(_evaluate, argv, prog="fgvc-eval")


def predict(argv: Optional[Sequence[str]] = None) -> int:
    """``fgvc-predict CHECKPOINT IMAGE_OR_FOLDER... [--date ..] [--lat .. --lon ..] ...``; returns the exit status."""
    return run_cli(_predict, argv, prog="fgvc-predict")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m fgvc.cli COMMAND ...`` (e.g. under ``torchrun -m fgvc.cli train ...``): the same commands
    as the console scripts, by name."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {n: f for n, f in globals().items() if n in ("train", "evaluate", "predict", "export", "average", "prepare_text") and callable(f)}
    if not argv or argv[0] not in commands:
        print(f"usage: python -m fgvc.cli {{{','.join(commands)}}} [arguments]", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


def export(argv: Optional[Sequence[str]] = None) -> int:
    """``fgvc-export CHECKPOINT [--out PATH.pt2] [--format pt2 onnx]``; returns the exit status."""
    return run_cli(_export, argv, prog="fgvc-export")


def average(argv: Optional[Sequence[str]] = None) -> int:
    """``fgvc-average CHECKPOINT... --out PATH [--ema]``: checkpoint averaging; returns the exit status."""
    return run_cli(_average, argv, prog="fgvc-average")


def prepare_text(argv: Optional[Sequence[str]] = None) -> int:
    """``fgvc-prepare-text --root CUB --bert BERT_DIR``: CUB caption embeddings; returns the exit status."""
    return run_cli(_prepare_text, argv, prog="fgvc-prepare-text")


if __name__ == "__main__":
    sys.exit(main())
