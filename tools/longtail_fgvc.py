#!/usr/bin/env python
"""Long-tailed demo: uniform vs class-balanced vs square-root sampling vs the logit-adjusted loss.

    python tools/longtail_fgvc.py --out outputs/fgvc_longtail --epochs 12

The logic lives in ``fgvc.longtail_demo`` (``compare(out_dir)``); see docs/fgvc_training.md.
"""
import sys

from fgvc.longtail_demo import longtail_command
from sparse_mim.utils.cli import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(longtail_command, sys.argv[1:], prog="tools/longtail_fgvc.py"))
