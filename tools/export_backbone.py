"""Export the encoder of a SparK checkpoint as a backbone state dict (spark-export); see --help and docs/pretraining.md."""
import sys

from sparse_mim.cli import export

if __name__ == "__main__":
    sys.exit(export())
