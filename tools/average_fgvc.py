#!/usr/bin/env python
"""Average the weights of several fgvc checkpoints of one model (same as ``fgvc-average``).

    python tools/average_fgvc.py outputs/cub/checkpoint-*.pth --out outputs/cub/average.pth [--ema]

The logic lives in ``fgvc.average`` (``average_checkpoints(paths, out)``); see docs/fgvc_training.md.
"""
import sys

from fgvc.cli import average

if __name__ == "__main__":
    sys.exit(average())
