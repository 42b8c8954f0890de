"""Reconstruction grids from a SparK checkpoint (spark-visualize); see --help and docs/pretraining.md."""
import sys

from sparse_mim.cli import visualize

if __name__ == "__main__":
    sys.exit(visualize())
