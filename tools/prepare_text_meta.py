#!/usr/bin/env python
"""Precompute CUB caption embeddings for MetaFormer's text meta tokens (same as ``fgvc-prepare-text``).

    python tools/prepare_text_meta.py --root /data/CUB_200_2011 --bert /models/bert-base-uncased
"""
import sys

from fgvc.cli import prepare_text

if __name__ == "__main__":
    sys.exit(prepare_text())
