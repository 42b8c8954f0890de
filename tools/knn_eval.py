"""k-NN (and linear-probe) accuracy of a SparK checkpoint's encoder (spark-knn); see --help and docs/pretraining.md."""
import sys

from sparse_mim.cli import knn

if __name__ == "__main__":
    sys.exit(knn())
