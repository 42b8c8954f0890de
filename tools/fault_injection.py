"""Fault injection for both trainers (kills, pre-emption, truncated / full-disk / non-finite checkpoints,
bad configs, hostile data); prints scenarios tried / passed / data lost. See docs/pretraining.md.

    python tools/fault_injection.py [--trainers pretrain fgvc] [--quick] [--workdir /tmp/fault_injection]
"""
import sys

from sparse_mim.fault_injection import main

if __name__ == "__main__":
    sys.exit(main())
