"""sparsify / dense_masked on real backbones, shared parameters, SyncBN conversion, clear errors on bad input."""
import copy

import pytest
import torch
from torch import nn

from sparse_mim.sparse import (SparseBatchNorm2d, SparseConv2d, SparseMap, SparseSyncBatchNorm, active_mask,
                               convert_sync_batchnorm, dense_masked, functional as SF, mask_at, sparsify)
from sparse_mim.testing import assert_equivalent, patch_mask

pytestmark = pytest.mark.usefixtures("one_torch_thread", "gather_path")

F64 = torch.float64


def _resnet18_trunk():
    import torchvision
    return nn.Sequential(*list(torchvision.models.resnet18().children())[:-2])


def _convnext(name):
    import timm
    model = timm.create_model(name, num_classes=0, global_pool="", drop_path_rate=0.0)
    for m in model.modules():  # GRN starts at zero (identity); make it do something
        if type(m).__name__ == "GlobalResponseNorm":
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)
    return model


@pytest.mark.parametrize("name,H,W,B,ratio,dtype", [
    ("resnet18", 64, 96, 2, 0.6, F64),
    # float32: torch's float64 CPU convs (dense-masked side) are very slow for ConvNeXt's 1x1 / 7x7 convs
    pytest.param("convnext_atto", 96, 64, 2, 0.6, torch.float32, marks=pytest.mark.precision),
    ("convnextv2_atto", 64, 64, 2, 0.6, F64),
])
def test_backbone_equivalence(name, H, W, B, ratio, dtype):
    """Whole trunks, unchanged timm / torchvision code: sparse twin == dense-masked twin (fwd, grads, BN stats)."""
    torch.manual_seed(0)
    model = (_resnet18_trunk() if name == "resnet18" else _convnext(name)).to(dtype).train()
    x = torch.randn(B, 3, H, W, dtype=dtype)
    assert_equivalent(model, x, patch_mask(B, H // 32, W // 32, ratio))


def test_sparsify_keeps_parameters_and_state_dict():
    import torchvision
    model = _resnet18_trunk()
    before = model.state_dict()
    params = {n: p for n, p in model.named_parameters()}
    assert sparsify(model) is model
    after = model.state_dict()
    assert list(before) == list(after)
    assert all(before[k].data_ptr() == after[k].data_ptr() for k in before)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert type(model[0]) is SparseConv2d and type(model[1]) is SparseBatchNorm2d
    assert isinstance(model[0], nn.Conv2d) and isinstance(model[1], nn.BatchNorm2d)
    dense = torchvision.models.resnet18()
    del dense.fc
    dense.load_state_dict(_renamed(after), strict=True)


def _renamed(sd):
    """Sequential trunk keys (0., 1., 4.) -> torchvision names (conv1., bn1., layer1.)."""
    names = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
    return {names[k.split(".", 1)[0]] + "." + k.split(".", 1)[1]: v for k, v in sd.items()}


def test_convert_sync_batchnorm_keeps_sparse():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).to(F64)
    x = torch.randn(2, 3, 64, 64, dtype=F64)
    vis = patch_mask(2, 2, 2, 0.5)
    reference = assert_equivalent(model, x, vis)["out_s"]
    sparse_model = sparsify(copy.deepcopy(model))
    weight = sparse_model[1].weight
    convert_sync_batchnorm(sparse_model)
    assert type(sparse_model[1]) is SparseSyncBatchNorm and sparse_model[1].weight is weight
    out = sparse_model(SparseMap.from_dense(x, vis)).dense()  # not distributed: falls back to local statistics
    assert torch.allclose(out, reference, rtol=1e-10, atol=1e-12)
    masked = convert_sync_batchnorm(dense_masked(copy.deepcopy(model)))
    assert isinstance(masked[1], nn.SyncBatchNorm)
    plain = convert_sync_batchnorm(copy.deepcopy(model))
    assert type(plain[1]) is nn.SyncBatchNorm


class _Custom(nn.Module):
    """A layer the engine has never seen: no parameters it knows, its own forward."""

    def forward(self, x):
        return torch.tanh(x) + x.mean((2, 3), keepdim=True)


def test_sparsify_never_refuses_a_layer_type():
    """Pools, adaptive pools and unknown layers convert (the old engine refused them) and stay exact."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Sequential(nn.AvgPool2d(2)), _Custom(),
                          nn.AdaptiveAvgPool2d(1)).to(F64)
    sparse_model = sparsify(copy.deepcopy(model))
    assert type(sparse_model[1][0]).__name__ == "SparseAvgPool2d"
    dense_masked(copy.deepcopy(model))
    trunk = model[:3]
    assert_equivalent(trunk, torch.randn(2, 3, 64, 96, dtype=F64), patch_mask(2, 2, 3, 0.5))


def test_unsupported_conv_configurations():
    sm = SparseMap.from_dense(torch.randn(1, 8, 32, 32), torch.ones(1, 1, 1, dtype=torch.bool))
    assert SF.conv2d(sm, torch.randn(8, 4, 3, 3), padding=1, groups=2).num_channels == 8  # grouped: supported now
    with pytest.raises(ValueError, match="patch grid"):
        SF.conv2d(sm, torch.randn(8, 8, 3, 3), padding=0)  # 'valid' padding would shrink the map
    with pytest.raises(ValueError, match="input channels"):
        SF.conv2d(sm, torch.randn(8, 4, 3, 3), padding=1)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    dense = torch.randn(1, 8, 32, 32)
    assert torch.equal(sparsify(copy.deepcopy(conv))(dense), conv(dense))  # dense input: the dense layer


def test_bad_input_messages():
    x = torch.randn(2, 3, 64, 96)
    with pytest.raises(ValueError, match="does not fit"):  # mask shape does not fit the image
        SparseMap.from_dense(x, torch.ones(2, 2, 2, dtype=torch.bool), patch_size=32)
    with pytest.raises(ValueError, match="not a multiple of the patch size 32"):
        SparseMap.from_dense(torch.randn(2, 3, 64, 80), torch.ones(2, 2, 2, dtype=torch.bool), patch_size=32)
    empty = torch.ones(2, 2, 3, dtype=torch.bool)
    empty[1] = False
    with pytest.raises(ValueError, match=r"images \[1\] of the batch have no visible patch"):
        SparseMap.from_dense(x, empty, patch_size=32)
    with pytest.raises(ValueError, match="same device"):  # mismatched devices (meta stands in for a GPU)
        SparseMap.from_dense(x, torch.ones(2, 2, 3, dtype=torch.bool, device="meta"))
    sm = SparseMap.from_dense(x, torch.ones(2, 2, 3, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="same device"):
        SF.conv2d(sm, torch.randn(8, 3, 3, 3, device="meta"), padding=1)
    with pytest.raises(RuntimeError, match="active_mask"):
        dense_masked(nn.Conv2d(3, 3, 3, padding=1))(x)
    with active_mask(torch.ones(2, 2, 2, dtype=torch.bool)):
        with pytest.raises(ValueError, match="does not fit"):
            mask_at(x)  # the image does not fit the mask (the dense-masked layers leave off-grid maps unmasked)


def test_dense_masked_rectangular_mask_at_every_scale():
    """The mask at a resolution is the patch mask upsampled by resolution // grid (rectangular too)."""
    from sparse_mim.sparse import mask_at
    vis = patch_mask(2, 2, 3, 0.5)
    with active_mask(vis):
        for stride in (1, 2, 4, 8, 16, 32):
            t = torch.zeros(2, 1, 64 // stride, 96 // stride)
            f = 32 // stride
            assert torch.equal(mask_at(t)[:, 0].bool(), vis.repeat_interleave(f, 1).repeat_interleave(f, 2))
