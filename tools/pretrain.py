"""SparK pre-training (spark-pretrain); see --help and docs/pretraining.md."""
import sys

from sparse_mim.cli import pretrain

if __name__ == "__main__":
    sys.exit(pretrain())
