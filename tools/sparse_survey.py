#!/usr/bin/env python
"""Survey timm convnets on the sparse engine: MAC shares and, with --check, the distance to the dense-masked twin.

Development tooling: the logic and the options are in ``repotools.sparse_survey`` (a clone's, not installed with
the package); ``--help`` lists them. See docs/benchmarks.md.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the clone: repotools, sparse_mim, fgvc

from repotools.sparse_survey import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
