"""timm convnets, unchanged, on sparse maps: `sparsify` never refuses a family, and small ones equal their
dense-masked twins (forward, input grad, every parameter grad, BN statistics in train mode).

The per-family backbone tests (tests/backbones) cover every family at a square and a rectangular size; here
the engine side: conversion of every family of the list, and three small nets that together use grouped
convs, squeeze-excitation gates, strided depthwise convs, hard-swish and TF 'same' padding (the dense
fallback), in float64.
"""
import copy

import pytest
import torch

from sparse_mim.sparse import (SparseAvgPool2d, SparseConv2d, SparseMap, active_mask, dense_masked,
                               functional as SF, mac_report, mask_at, sparsify)
from sparse_mim.testing import patch_mask

pytestmark = pytest.mark.usefixtures("one_torch_thread")
timm = pytest.importorskip("timm")

F64 = torch.float64
FAMILIES = ["resnet50d", "res2net50_26w_4s", "densenet121", "resnext50_32x4d", "regnetx_002", "seresnet50",
            "efficientnet_b0", "mobilenetv3_large_100", "cspresnet50", "repvgg_a0", "resnet18", "convnext_atto",
            "convnextv2_atto", "vgg11"]


@pytest.fixture(autouse=True)
def _gather_paths():
    previous = SF.set_conv_backend("gather")
    yield
    SF.set_conv_backend(previous)


def test_sparsify_converts_every_family():
    """No family is refused (the old engine refused AvgPool2d and grouped convs); convs and pools are twins."""
    for name in FAMILIES:
        model = timm.create_model(name, num_classes=0, global_pool="")
        before = {k: v.data_ptr() for k, v in model.state_dict().items()}
        sparsify(model)
        assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before, name
        kinds = {type(m) for m in model.modules()}
        assert SparseConv2d in kinds, name
        if name in ("resnet50d", "res2net50_26w_4s", "densenet121"):
            assert SparseAvgPool2d in kinds, name


def _compare(name, H, W, fallback_ops=()):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=0, global_pool="").to(F64).train()
    B = 2
    x = torch.randn(B, 3, H, W, dtype=F64)
    vis = patch_mask(B, H // 32, W // 32, 0.5, seed=1)
    sparse, masked = sparsify(copy.deepcopy(model)), dense_masked(copy.deepcopy(model))
    xs, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    with mac_report() as rep:
        out_s = sparse.forward_features(SparseMap.from_dense(xs, vis, patch_size=32))
    with active_mask(vis):
        out_d = masked.forward_features(xd * mask_at(xd))
        out_d = out_d * mask_at(out_d)
    assert isinstance(out_s, SparseMap)
    g = torch.randn_like(out_d)
    (out_s.dense() * g).sum().backward()
    (out_d * g).sum().backward()
    scale = float(max(p.grad.abs().max() for p in masked.parameters() if p.grad is not None))
    assert torch.allclose(out_s.dense(), out_d, rtol=1e-9, atol=1e-11 * float(out_d.abs().max()))
    assert torch.allclose(xs.grad, xd.grad, rtol=1e-9, atol=1e-11 * float(xd.grad.abs().max()))
    for (n, p_s), p_d in zip(sparse.named_parameters(), masked.parameters()):
        assert (p_s.grad is None) == (p_d.grad is None), n
        if p_d.grad is not None:  # atol: BN biases feeding a train-mode BN have grads that are 0 up to rounding
            assert torch.allclose(p_s.grad, p_d.grad, rtol=1e-8, atol=1e-11 * scale), n
    for (n, b_s), b_d in zip(sparse.named_buffers(), masked.buffers()):
        assert torch.allclose(b_s.double(), b_d.double(), rtol=1e-9, atol=1e-12), n
    assert {r["op"] for r in rep.fallback_rows()} == set(fallback_ops), rep.format()
    return rep


@pytest.mark.parametrize("name,H,W,fallback_ops", [
    ("regnetx_002", 64, 96, ()),  # grouped convs, strided grouped convs
    ("mobilenetv3_small_050", 96, 64, ()),  # SE gates, strided depthwise, hard-swish
    ("tf_mobilenetv3_small_minimal_100", 64, 64, ()),  # TF 'same' padding (timm Conv2dSame)
])
def test_small_timm_nets_equal_dense_masked(name, H, W, fallback_ops):
    rep = _compare(name, H, W, fallback_ops)
    if not fallback_ops:
        assert rep.macs("sparse") / rep.total_macs > 0.8, rep.format()


def test_survey_functions():
    """The library behind tools/sparse_survey.py: MAC shares and the distance to the dense-masked twin."""
    from torch import nn

    from repotools.sparse_survey import compare_with_dense_masked, mac_shares, random_patch_mask
    model = nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.BatchNorm2d(8), nn.GroupNorm(2, 8),
                          nn.Conv2d(8, 8, 3, padding=1, groups=2)).to(F64).train()
    x, vis = torch.randn(2, 3, 64, 96, dtype=F64), random_patch_mask(2, 2, 3, 0.5)
    r = compare_with_dense_masked(model, x, vis)
    assert r["sparse_output"] and max(r["output"], r["input_grad"], r["param_grad_vs_largest"]) < 1e-12
    assert [row["op"] for row in r["report"].fallback_rows()] == ["group_norm"]
    rep = mac_shares(model, x, vis)
    assert rep.macs("sparse") > 0 and 0 < rep.fallback_share < 0.1
