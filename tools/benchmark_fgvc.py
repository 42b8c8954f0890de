#!/usr/bin/env python
"""MetaFormer speed: fp32 vs bf16 (vs fp16) and fused SDPA vs explicit attention, in one run.

Development tooling: the logic and the options are in ``repotools.benchmark_fgvc`` (a clone's, not installed with
the package); ``--help`` lists them. See docs/benchmarks.md.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the clone: repotools, sparse_mim, fgvc

from repotools.benchmark_fgvc import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
