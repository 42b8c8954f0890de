"""Fault injection for both trainers (kills, pre-emption, Ctrl-C once and twice, truncated / full-disk /
non-finite checkpoints, full disk while writing the demo data, bad configs, hostile recipes / checkpoints /
.pt2 programs / CSVs / images, an unreadable resume, checkpoints of the other half, concurrent autotune-cache
writers); prints scenarios tried / held / data lost. See docs/pretraining.md and docs/operations.md.

    python tools/fault_injection.py [--trainers pretrain fgvc] [--quick] [--workdir /tmp/fault_injection]
"""
import sys

from sparse_mim.fault_injection import main

if __name__ == "__main__":
    sys.exit(main())
