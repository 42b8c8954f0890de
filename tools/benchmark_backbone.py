#!/usr/bin/env python
"""Benchmark sparse backbones against SparK's dense-masked simulation of the same weights.

Development tooling: the logic and the options are in ``repotools.benchmark_backbone`` (a clone's, not installed with
the package); ``--help`` lists them. See docs/benchmarks.md.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the clone: repotools, sparse_mim, fgvc

from repotools.benchmark_backbone import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
