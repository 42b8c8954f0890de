#!/usr/bin/env python
"""Fine-tune MetaFormer on a fine-grained dataset with meta (same as the ``fgvc-train`` command).

    python tools/train_fgvc.py                      # the offline CPU demo
    python tools/train_fgvc.py -c configs/fgvc/cub_metaformer0_224.yaml data.root=/data/CUB_200_2011
    python tools/train_fgvc.py --help               # every config key with its default and meaning

The logic lives in ``fgvc.train`` (``train(cfg) -> summary``); see docs/fgvc_training.md.
"""
import sys

from fgvc.cli import train

if __name__ == "__main__":
    sys.exit(train())
