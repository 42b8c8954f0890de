#!/usr/bin/env python
"""Long-tailed demo: uniform vs class-balanced vs square-root sampling vs the logit-adjusted loss.

Development tooling: the logic and the options are in ``repotools.longtail_fgvc`` (a clone's, not installed with
the package); ``--help`` lists them. See docs/benchmarks.md.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the clone: repotools, sparse_mim, fgvc

from repotools.longtail_fgvc import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
