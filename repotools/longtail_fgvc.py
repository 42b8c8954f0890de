"""A long-tailed demo: does class-aware sampling or logit adjustment help the few-shot classes?

``python tools/longtail_fgvc.py [--out DIR] [--epochs N]`` generates the demo dataset
(:mod:`fgvc.demo`) with a steep training class profile: 12 classes whose training images fall
geometrically from 150 to 5 (the test split stays balanced, 20 per class). The two classes of
each look (same images, told apart only by latitude or season) get a head and a tail count,
so a model that follows the training prior confuses the tail class with its head twin. It then
trains the tiny CPU recipe once per setting (uniform / class-balanced / square-root sampling
with cross-entropy, uniform sampling with the logit-adjusted loss), with the same seed and
epochs, and prints test top-1, mean per-class top-1 and many / medium / few-shot top-1 of each.
Measured numbers are in docs/fgvc_training.md ("Long-tailed data").
"""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Sequence, Tuple

__all__ = ["longtail_profile", "SETTINGS", "compare", "longtail_command", "main"]

SETTINGS: Tuple[Tuple[str, str, str], ...] = (
    ("uniform", "uniform", "ce"), ("class_balanced", "class_balanced", "ce"), ("sqrt", "sqrt", "ce"),
    ("uniform+logit_adjusted", "uniform", "logit_adjusted"))


def longtail_profile(n_looks: int = 6, head: int = 150, tail: int = 5) -> List[int]:
    """Training images per class (:func:`fgvc.demo.class_names` order): a geometric fall from ``head`` to
    ``tail`` over the ``2 * n_looks`` classes, the k-th largest and the k-th smallest count sharing a look."""
    k = 2 * n_looks
    counts = [int(round(head * (tail / head) ** (i / (k - 1)))) for i in range(k)]
    out = []
    for look in range(n_looks):
        out += [counts[look], counts[k - 1 - look]]
    return out


def compare(out_dir: str, epochs: int = 12, settings: Sequence[Tuple[str, str, str]] = SETTINGS, seed: int = 0,
            log: Callable = print) -> Dict[str, Dict]:
    """Generate the data into ``out_dir/data``, train each setting into ``out_dir/<name>``; returns
    ``{name: final.json}`` and prints the table."""
    from sparse_mim.utils.config import load_config
    from fgvc.demo import make_demo_dataset
    from fgvc.train import DEFAULTS, train, validate_config
    root = os.path.join(out_dir, "data")
    counts = longtail_profile()
    make_demo_dataset(root, n_looks=6, test_per_class=20, image_size=32, seed=seed, train_counts=counts)
    log(f"[longtail] training images per class: {counts} (test: 20 per class)")
    results = {}
    for name, sampler, loss in settings:
        run = os.path.join(out_dir, name)
        final_path = os.path.join(run, "final.json")
        if os.path.isfile(final_path):  # a finished setting is not trained again
            with open(final_path) as f:
                results[name] = json.load(f)
            continue
        cfg = load_config(DEFAULTS, "fgvc/demo.yaml", [
            f"data.root={root}", f"output_dir={run}", f"train.epochs={epochs}", f"data.sampler={sampler}",
            f"train.loss={loss}", f"seed={seed}", "log.progress=false", "wandb.enabled=false",
            "train.eval_meta_zeroed=false"], validate=validate_config)
        results[name] = train(cfg, log=lambda *a: None)
        log(f"[longtail] {name}: done")
    log(f"{'setting':<24s} {'top1':>6s} {'mean/cls':>8s} {'many':>6s} {'medium':>6s} {'few':>6s}")
    for name, r in results.items():
        cells = [r.get(k) for k in ("test/top1", "test/mean_per_class_top1", "test/many_shot", "test/medium_shot",
                                    "test/few_shot")]
        log(f"{name:<24s} " + " ".join(f"{c:6.2f}" if c is not None else f"{'-':>6s}" for c in cells))
    return results


def longtail_command(argv: Sequence[str], log=print) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="tools/longtail_fgvc.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/fgvc_longtail", help="folder for the data and the runs")
    p.add_argument("--epochs", type=int, default=12, help="epochs per run (default 12)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(list(argv))
    compare(args.out, epochs=args.epochs, seed=args.seed, log=log)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``tools/longtail_fgvc.py``: errors as one line and an exit status, as the trainers' commands."""
    import sys
    from sparse_mim.utils.cli import run_cli
    return run_cli(longtail_command, sys.argv[1:] if argv is None else argv, prog="tools/longtail_fgvc.py")
