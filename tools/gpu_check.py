#!/usr/bin/env python
"""Numerical and speed checks of the sparse engine and SparK on a GPU (see docs/gpu.md).

Development tooling: the logic and the options are in ``repotools.gpu_check`` (a clone's, not installed with
the package); ``--help`` lists them. See docs/benchmarks.md.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the clone: repotools, sparse_mim, fgvc

from repotools.gpu_check import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
