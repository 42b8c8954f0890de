"""Sparse backbones == SparK's dense-masked simulation of the same weights (outputs, gradients, BN buffers).

Every registered backbone is checked in eval and train mode on a random patch mask,
with weights that make every layer matter (`randomize_weights_`: layer scale ~1, GRN
on, non-trivial BN statistics). The cheapest model of each family runs at full depth,
the others at reduced depth (the same blocks per stage at their own widths), while
their full-depth layouts are checked key by key against torchvision / timm in
test_backbone_weights.py and ResNet-50 / ConvNeXt-S run at full depth at 224 (slow). float64 keeps rounding far below the 1e-4 tolerance, so a
failure means a real difference (one float32 eval check is included).
"""
import pytest
import torch

import sparse_mim
from sparse_mim.backbones import list_backbones
from sparse_mim.testing import assert_backbones_equivalent as assert_equivalent
from sparse_mim.testing import random_visible_mask, randomize_weights_
from sparse_mim.testing import relative_error as _rel
from sparse_mim.sparse import SparseMap


pytestmark = pytest.mark.usefixtures("one_torch_thread")


TOL = 1e-4  # relative; float64 rounding is ~1e-12
# Full depth for the cheapest of each family; the others at reduced depth (their blocks are those of a
# sibling at another width; full layouts are checked key by key in test_backbone_weights.py, and
# ResNet-50 / ConvNeXt-S run at full depth in the slow 224 test).
FULL = ["resnet18", "convnext_atto", "convnextv2_atto"]
REDUCED = {"resnet34": (1, 2, 2, 1), "resnet50": (1, 2, 2, 1), "resnet101": (1, 1, 2, 1), "resnet152": (1, 2, 2, 1),
           "resnet200": (1, 2, 2, 1)}
REDUCED.update({f"convnext{v}_{s}": (1, 1, 2, 1) for v in ("", "v2")
                for s in ("femto", "pico", "nano", "tiny", "small", "base", "large")})


def test_every_backbone_is_covered():
    assert sorted(FULL + list(REDUCED)) == sorted(list_backbones("resnet*") + list_backbones("convnext*"))


def _twins(name, dtype=torch.float64, **kwargs):
    """A sparse backbone and its dense-masked twin sharing randomised weights."""
    sparse = sparse_mim.create_backbone(name, sparse=True, **kwargs)
    randomize_weights_(sparse, torch.Generator().manual_seed(1))
    sparse.to(dtype)
    dense = sparse_mim.create_backbone(name, sparse=False, **kwargs).to(dtype)
    dense.load_state_dict(sparse.state_dict())
    return sparse, dense


@pytest.mark.parametrize("name", FULL + sorted(REDUCED))
def test_sparse_equals_dense_masked(name):
    kwargs = {"depths": REDUCED[name]} if name in REDUCED else {}
    sparse, dense = _twins(name, drop_path_rate=0.0, **kwargs)
    plain = sparse_mim.create_backbone(name, sparse=None, drop_path_rate=0.0, **kwargs)  # the hook reference
    images = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    visible = random_visible_mask(2, 2, 3, 0.6, torch.Generator().manual_seed(3))
    visible[1] = torch.tensor([[True, False, True], [False, True, False]])  # non-adjacent patches too
    assert_equivalent(sparse, dense, images, visible, train=False, reference=plain)
    assert_equivalent(sparse, dense, images, visible, train=True, reference=plain)


@pytest.mark.parametrize("name", ["resnet50", "convnextv2_atto"])
def test_drop_path_draws_the_same_samples(name):
    """Per-sample stochastic depth: same seed -> same dropped samples in both twins."""
    sparse, dense = _twins(name, drop_path_rate=0.5, depths=(1, 1, 2, 1))
    sparse.train()
    dense.train()
    images = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    visible = random_visible_mask(4, 2, 2, 0.5, torch.Generator().manual_seed(0))
    torch.manual_seed(11)
    out_s = sparse(images, visible)
    torch.manual_seed(11)
    out_d = dense(images, visible)
    torch.manual_seed(12)
    out_other = dense(images, visible)
    for a, b in zip(out_s, out_d):
        assert _rel(a, b) < TOL
    assert _rel(out_other[-1], out_d[-1]) > 1e-3  # drop path is really active


def test_return_sparse_and_rectangular_input():
    sparse, dense = _twins("convnext_atto", dtype=torch.float32, depths=(1, 1, 1, 1))
    sparse.eval()
    images = torch.randn(2, 3, 96, 64)
    visible = random_visible_mask(2, 3, 2, 0.6, torch.Generator().manual_seed(5))
    maps = sparse(images, visible, return_sparse=True)
    assert all(isinstance(m, SparseMap) for m in maps)
    for i, m in enumerate(maps):
        assert m.spatial_shape == (96 // (4 * 2 ** i), 64 // (4 * 2 ** i))
        assert m.num_channels == sparse.channels[i]
        assert m.num_sites == int(visible.sum()) * (8 // 2 ** i) ** 2
    dense_maps = sparse(images, visible)
    for m, d in zip(maps, dense_maps):
        assert torch.equal(m.dense(), d)


def test_interface_and_input_errors():
    net = sparse_mim.create_backbone("resnet18")
    assert net.downsample_ratio == 32 and net.get_downsample_ratio() == 32
    assert net.channels == [64, 128, 256, 512] and net.sparse
    assert sparse_mim.create_backbone("convnext_tiny", sparse=False).channels == [96, 192, 384, 768]
    assert sparse_mim.create_backbone("resnet50", depths=(1, 1, 1, 1)).channels == [256, 512, 1024, 2048]
    images = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match="not divisible by the backbone's downsample ratio 32"):
        net(torch.randn(1, 3, 60, 64), torch.ones(1, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"expected \(B, H/32, W/32\)"):
        net(images, torch.ones(1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        net(images, torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match="no visible patch"):
        net(images, torch.zeros(1, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown backbone 'resnet51'"):
        sparse_mim.create_backbone("resnet51")
    with pytest.raises(ValueError, match="return_sparse=True needs a sparse backbone"):
        sparse_mim.create_backbone("resnet18", sparse=False)(images, return_sparse=True)
    # the official SparK mask layout [B, 1, h, w] is accepted
    net.eval()
    visible = torch.tensor([[[True, False], [False, True]]])
    for a, b in zip(net(images, visible[:, None]), net(images, visible)):
        assert torch.equal(a, b)


def test_default_drop_path_rates():
    rates = {"resnet50": 0.05, "resnet101": 0.08, "resnet152": 0.10, "resnet200": 0.15,
             "convnext_small": 0.2, "convnext_base": 0.3, "convnext_large": 0.4, "convnextv2_large": 0.4}
    with torch.device("meta"):
        for name, rate in rates.items():
            net = sparse_mim.create_backbone(name, sparse=False)
            assert net.drop_path_rate == pytest.approx(rate)
            last = [m for m in net.modules() if type(m).__name__.endswith("DropPath")][-1]
            assert last.drop_prob == pytest.approx(rate)
        assert sparse_mim.create_backbone("resnet50", sparse=False, drop_path_rate=0.3).drop_path_rate == 0.3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "convnext_small"])
def test_sparse_equals_dense_masked_at_224(name):
    """Full models at the pre-training size. float64: in float32, train-mode BN over the few
    visible sites at stride 32 amplifies summation-order rounding to ~1e-3 in single gradients."""
    sparse, dense = _twins(name, drop_path_rate=0.0)
    plain = sparse_mim.create_backbone(name, sparse=None, drop_path_rate=0.0)
    images = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    visible = random_visible_mask(2, 7, 7, 0.6, torch.Generator().manual_seed(0))
    assert_equivalent(sparse, dense, images, visible, train=False, reference=plain)
    assert_equivalent(sparse, dense, images, visible, train=True, reference=plain)


@pytest.mark.keep_threads
@pytest.mark.precision
def test_float32_agrees_in_eval_mode():
    """The dtype used in practice: float32 maps and gradients in eval mode, under the shared error model."""
    kwargs = {"drop_path_rate": 0.0, "depths": (1, 1, 2, 1)}
    sparse, dense = _twins("resnet50", dtype=torch.float32, **kwargs)
    plain = sparse_mim.create_backbone("resnet50", sparse=None, **kwargs)
    images = torch.randn(2, 3, 96, 128)
    visible = random_visible_mask(2, 3, 4, 0.6, torch.Generator().manual_seed(4))
    assert_equivalent(sparse, dense, images, visible, train=False, reference=plain)
