#!/usr/bin/env python
"""Fault injection for both trainers; prints scenarios tried / held / data lost (docs/pretraining.md).

Development tooling: the logic and the options are in ``repotools.fault_injection`` (a clone's, not installed with
the package); ``--help`` lists them. See docs/benchmarks.md.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the clone: repotools, sparse_mim, fgvc

from repotools.fault_injection import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
