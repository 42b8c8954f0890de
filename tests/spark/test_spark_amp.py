"""SparK under bf16 autocast: the sparse encoder equals its dense-masked reference (loss, reconstruction,
every gradient and BN buffer, in train and eval mode) under the shared error model
(`sparse_mim.testing.assert_spark_equivalent`), the loss is computed in fp32, and master weights and
gradients stay fp32. Train-mode BatchNorm over a handful of visible sites amplifies a single bf16 flip (up
to ~20% of the small reconstruction at init); the float64 reference with modelled bf16 rounding goes
through the same statistics, so the amplification sets the bound instead of a number read off one CPU.
"""
from __future__ import annotations

import pytest
import torch

import sparse_mim
from sparse_mim.spark import SparK
from sparse_mim.testing import assert_spark_equivalent

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.precision]

U = 2.0 ** -8


@pytest.mark.parametrize("name", ["resnet18", "convnextv2_atto"])
def test_spark_bf16_sparse_equals_dense_reference(name):
    torch.manual_seed(0)
    sparse = SparK(name, input_size=(64, 64), decoder_width=64, drop_path_rate=0.0, init="trunc_normal")
    dense = sparse.dense_reference()
    plain = sparse_mim.create_backbone(name, sparse=None, drop_path_rate=0.0)
    images = torch.randn(2, 3, 64, 64)
    visible = sparse.mask(2, generator=torch.Generator().manual_seed(2))
    for train in (False, True):
        sparse.train(train), dense.train(train)
        assert_spark_equivalent(sparse, dense, images, visible, reference_backbone=plain, autocast=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = sparse(images, visible)
    assert loss.dtype == torch.float32, "the SparK loss must be reduced in fp32 under autocast"
    assert all(p.dtype == torch.float32 for p in sparse.parameters())
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in sparse.parameters())


def test_spark_bf16_loss_follows_fp32():
    """The bf16 loss is a faithful copy of the fp32 one on the same weights and mask (loss: a mean of
    ~10^4 squared errors of O(1) values, each rounded once: relative error << u)."""
    torch.manual_seed(0)
    model = SparK("resnet18", input_size=(64, 64), decoder_width=64, drop_path_rate=0.0).eval()
    images = torch.randn(2, 3, 64, 64)
    visible = model.mask(2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        l32, _, _ = model(images, visible)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            l16, _, _ = model(images, visible)
    assert abs(float(l16 - l32)) <= 2 * U * float(l32)
