"""Test-wide settings: no wandb network, deterministic seeds, quiet spconv import."""
import os
import warnings

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("SPARSE_MIM_AUTOTUNE_CACHE", "off")  # the conv autotuner keeps its choices in memory only
warnings.filterwarnings("ignore", message=r"`torch.cuda.amp.custom_(fwd|bwd)", category=FutureWarning)

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_torch_thread(request):
    """One intra-op torch thread for the test (restored after).

    At the tiny sizes of these tests OpenMP barriers dominate, and on a shared 2-core CPU two spinning
    threads cost several times the CPU time (measured). Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``; a test marked ``keep_threads`` runs
    with torch's default thread count.
    """
    if request.node.get_closest_marker("keep_threads"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
