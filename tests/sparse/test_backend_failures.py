"""An implementation that raises on a layer (spconv without an fp16 kernel for a channel count, ...):
a forced mode stops with a one-line error naming the layer and the fix; the table and autotune modes
announce the fall-back once and run the exact gather path. The failing call is injected."""
import warnings

import pytest
import torch

from sparse_mim.sparse import SparseMap, autotune, spconv_backend
from sparse_mim.sparse import functional as SF
from sparse_mim.testing import patch_mask
from sparse_mim.utils.cli import one_line

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def failing_spconv(monkeypatch):
    calls = []

    def fail(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no fp16 kernel for 37 input channels\n(more lines of a C++ trace)")
    monkeypatch.setattr(spconv_backend, "subm_conv2d", fail)
    monkeypatch.setattr(spconv_backend, "spconv_supports", lambda features: True)  # spconv eligible here
    previous = autotune.get_mode()
    autotune.reset()
    yield calls
    autotune.set_mode(previous)
    autotune.reset()


def _layer():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 37, 16, 16, generator=g, dtype=torch.float64)
    vis = patch_mask(2, 2, 2, 0.5, seed=1)
    w = torch.randn(8, 37, 3, 3, generator=g, dtype=torch.float64)
    return SparseMap.from_dense(x, vis), w


def test_forced_spconv_failure_is_one_clear_line(failing_spconv):
    autotune.set_mode("spconv")
    x, w = _layer()
    with pytest.raises(autotune.BackendError) as info:
        SF.conv2d(x, w, padding=1)
    text = one_line(info.value)
    assert "\n" not in str(info.value)
    for part in ("conv_backend=spconv", "conv 3x3 37>8 at 16x16", "float64", "no fp16 kernel for 37 input channels",
                 "conv_backend=autotune or table"):
        assert part in text, (part, text)
    assert len(failing_spconv) == 1


def test_table_mode_announces_the_fallback_once_and_stays_exact(failing_spconv, monkeypatch):
    autotune.set_mode("table")
    monkeypatch.setitem(autotune._TABLE_RULES, "conv", lambda call: "spconv")  # the CUDA rule, here on the CPU
    x, w = _layer()
    autotune.set_mode("gather")
    expected = SF.conv2d(x, w, padding=1).features
    autotune.set_mode("table")
    with pytest.warns(RuntimeWarning, match=r"spconv failed on a conv 3x3 37>8 .*exact gather path from now on"):
        out = SF.conv2d(x, w, padding=1)
    assert torch.equal(out.features, expected)
    assert autotune.last_path() == "gather" and len(failing_spconv) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # announced once; spconv is not tried again for this configuration
        out2 = SF.conv2d(x, w, padding=1)
    assert torch.equal(out2.features, expected) and len(failing_spconv) == 1
    (choice,) = [c for c in autotune.choices().values() if c["op"] == "conv"]
    assert choice["path"] == "gather" and choice["source"] == "fallback" and "failed" in choice["times_ms"]["spconv"]


def test_autotune_choice_that_fails_later_falls_back(failing_spconv):
    """A choice of spconv made elsewhere (cache file, rank 0) that raises here: announced, then gather."""
    autotune.set_mode("autotune")
    x, w = _layer()
    call = autotune.OpCall("conv", x, w, (3, 3), (1, 1), (1, 1), (1, 1), 1, x)
    key = autotune._key(call.describe())
    autotune._S.choices[key] = autotune.Choice("spconv", {}, "rank 0", 0.0, call.describe())
    with pytest.warns(RuntimeWarning, match="spconv failed"):
        SF.conv2d(x, w, padding=1)
    assert autotune.choices()[key]["path"] == "gather"
    SF.conv2d(x, w, padding=1)
    assert len(failing_spconv) == 1
