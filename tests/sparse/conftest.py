"""Fixtures shared by the sparse-engine tests."""
import pytest

from sparse_mim.sparse import functional as SF


@pytest.fixture
def gather_path():
    """One fixed path (gather), no autotuning: timing runs (and the spconv import the path choice needs)
    would dominate tiny tests; every path is exact, `test_sparse_ops` checks each."""
    previous = SF.set_conv_backend("gather")
    yield
    SF.set_conv_backend(previous)
