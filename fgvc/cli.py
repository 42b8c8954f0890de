"""Command-line entry points of the fgvc half (console scripts ``fgvc-*`` and ``tools/*_fgvc.py``).

One convention for every command: ``[POSITIONALS] [-c CONFIG.yaml] [key=value ...]``, parsed
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

__all__ = ["train", "evaluate", "predict", "export", "average", "prepare_text", "TRAIN_DESCRIPTION", "EVAL_DESCRIPTION"]

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


def train(argv: Optional[Sequence[str]] = None) -> int:
    """``fgvc-train [-c CONFIG] [key=value ...]``; returns the exit status."""
    from sparse_mim.utils.cli import run_cli
    return run_cli(_train, list(sys.argv[1:] if argv is None else argv), prog="fgvc-train")


def evaluate(argv: Optional[Sequence[str]] = None) -> int:
    """``fgvc-eval CHECKPOINT [-c CONFIG] [key=value ...]``; returns the exit status."""
    from sparse_mim.utils.cli import run_cli
    return run_cli(_evaluate, list(sys.argv[1:] if argv is None else argv), prog="fgvc-eval")


def predict(argv: Optional[Sequence[str]] = None) -> int:
    """``fgvc-predict CHECKPOINT IMAGE_OR_FOLDER... [--date ..] [--lat .. --lon ..] ...``; returns the exit status."""
    from sparse_mim.utils.cli import run_cli
    from .predict import predict_command
    return run_cli(predict_command, list(sys.argv[1:] if argv is None else argv), prog="fgvc-predict")


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
    from sparse_mim.utils.cli import run_cli
    from .export import export_command
    return run_cli(export_command, list(sys.argv[1:] if argv is None else argv), prog="fgvc-export")


def average(argv: Optional[Sequence[str]] = None) -> int:
    """``fgvc-average CHECKPOINT... --out PATH [--ema]``: checkpoint averaging; returns the exit status."""
    from sparse_mim.utils.cli import run_cli
    from .average import average_command
    return run_cli(average_command, list(sys.argv[1:] if argv is None else argv), prog="fgvc-average")


def prepare_text(argv: Optional[Sequence[str]] = None) -> int:
    """``fgvc-prepare-text --root CUB --bert BERT_DIR``: CUB caption embeddings; returns the exit status."""
    from sparse_mim.utils.cli import run_cli
    from .data.text_meta import prepare_text_command
    return run_cli(prepare_text_command, list(sys.argv[1:] if argv is None else argv), prog="fgvc-prepare-text")


if __name__ == "__main__":
    sys.exit(main())
