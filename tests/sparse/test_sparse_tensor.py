"""SparseMap: construction, canonical order, dense round trip, add refusal, mask validation."""
import pytest
import torch

from sparse_mim.spark import random_visible_mask
from sparse_mim.sparse import SparseMap

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _mask(B, h, w, keep, seed=0):
    return random_visible_mask(B, (h, w), keep, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("B,H,W", [(1, 64, 64), (4, 64, 96), (2, 96, 64)])
def test_round_trip_and_order(B, H, W):
    x = torch.randn(B, 5, H, W)
    vis = _mask(B, H // 32, W // 32, keep=max(1, (H // 32) * (W // 32) // 2))
    s = SparseMap.from_dense(x, vis)
    up = vis.repeat_interleave(32, 1).repeat_interleave(32, 2)
    assert torch.equal(s.dense(), x * up[:, None])
    idx = s.indices
    assert idx.dtype == torch.int32 and idx.is_contiguous() and idx.shape == (s.num_sites, 3)
    lin = (idx[:, 0].long() * H + idx[:, 1]) * W + idx[:, 2]
    assert torch.all(lin[1:] > lin[:-1]), "rows must be sorted by (batch, y, x)"
    assert torch.equal(s.features, x.permute(0, 2, 3, 1)[idx[:, 0].long(), idx[:, 1].long(), idx[:, 2].long()])
    assert torch.equal(s.sites_per_sample, up.flatten(1).sum(1))
    assert torch.equal(s.dense(fill=-1.0)[~up[:, None].expand_as(x)], torch.full(((~up).sum().item() * 5,), -1.0))


def test_dense_is_differentiable():
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    vis = _mask(2, 2, 2, keep=2)
    SparseMap.from_dense(x, vis).dense().sum().backward()
    up = vis.repeat_interleave(32, 1).repeat_interleave(32, 2)
    assert torch.equal(x.grad, up[:, None].expand_as(x).float())


def test_add_requires_same_sites():
    x = torch.randn(2, 4, 64, 64)
    a = SparseMap.from_dense(x, _mask(2, 2, 2, 2, seed=0))
    b = SparseMap.from_dense(x, _mask(2, 2, 2, 2, seed=1))
    assert torch.equal((a + a).features, 2 * a.features)
    c = SparseMap.from_dense(x, a.mask.clone())  # equal masks, different objects
    assert torch.equal((a + c).features, 2 * a.features)
    if not torch.equal(a.mask, b.mask):
        with pytest.raises(ValueError, match="active sites differ"):
            a + b


@pytest.mark.parametrize("vis,err", [
    (torch.ones(2, 3, 2, dtype=torch.bool), "does not fit"),
    (torch.ones(2, 2, 2), "bool"),
    (torch.ones(3, 2, 2, dtype=torch.bool), "batch"),
    (torch.tensor([[[True, False], [False, False]], [[False, False], [False, False]]]), "no visible patch"),
])
def test_bad_masks(vis, err):
    with pytest.raises((ValueError, TypeError), match=err):
        SparseMap.from_dense(torch.randn(2, 3, 64, 64), vis)
