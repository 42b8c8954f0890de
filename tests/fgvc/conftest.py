"""Fixtures shared by the fgvc tests."""
import pytest

from fgvc.demo import make_demo_dataset


@pytest.fixture(scope="module")
def demo_root(request, tmp_path_factory):
    """The generated demo dataset (2 looks, 32 px, seed 1) in a folder of the test module's own.

    Parametrised by the module: ``DEMO_PER_CLASS = (train, test)`` images per class (default (32, 16)).
    """
    train_per_class, test_per_class = getattr(request.module, "DEMO_PER_CLASS", (32, 16))
    root = str(tmp_path_factory.mktemp("fgvc_demo") / "data")
    make_demo_dataset(root, n_looks=2, train_per_class=train_per_class, test_per_class=test_per_class, image_size=32,
                      seed=1)
    return root
