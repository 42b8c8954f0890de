#!/usr/bin/env python
"""Evaluate a fine-grained classifier with and without its meta-information (same as ``fgvc-eval``).

    python tools/eval_fgvc.py outputs/fgvc_demo/best.pth
    python tools/eval_fgvc.py CHECKPOINT [-c CONFIG.yaml] [key=value ...]
    python tools/eval_fgvc.py --help                # every config key with its default and meaning

The logic lives in ``fgvc.evaluate`` (``evaluate_checkpoint(path, ...) -> summary``); see
docs/fgvc_training.md.
"""
import sys

from fgvc.cli import evaluate

if __name__ == "__main__":
    sys.exit(evaluate())
