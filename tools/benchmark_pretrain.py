#!/usr/bin/env python
"""Full SparK pre-training steps: the sparse encoder under each conv mode vs the dense-masked simulation.

Development tooling: the logic and the options are in ``repotools.benchmark_sparse`` (a clone's, not installed with
the package); ``--help`` lists them. See docs/benchmarks.md.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the clone: repotools, sparse_mim, fgvc

from repotools.benchmark_sparse import main_pretrain  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_pretrain())
