"""Sparse backbones == dense-masked twins under bf16 autocast (feature maps, input and weight gradients, BN
statistics), under the shared error model (`sparse_mim.testing.assert_backbones_equivalent`).

Same fp32 weights on both sides, autocast casts them alike; the twins differ only where a result lands on
the other side of a bf16 rounding boundary (u = 2^-8), and where their fp32 sums run in another order.
Each twin is measured against a float64 reference of the same computation (the plain dense backbone under
masking hooks) and the sparse one may err at most a fixed multiple of the dense-masked one, or of one
modelled bf16 rounding per layer. No bound is read off one CPU: an AVX-512-BF16 CPU (one rounding per
GEMM) and an AVX2 / SSE4.1 CPU (bf16 emulated, other blocking) both pass.

Train-mode BatchNorm over the few visible sites at stride 32 divides by a small standard deviation and
amplifies any rounding (0.11 against a fixed bf16 bound of 3.1e-2 on an AVX2 CPU). The float64 reference
with modelled rounding goes through the same BatchNorm, so the amplification is measured, not guessed:
the bound grows exactly where a correct implementation's error grows, and nowhere else.
"""
import pytest
import torch

import sparse_mim
from sparse_mim.testing import assert_backbones_equivalent, random_visible_mask, randomize_weights_

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.precision]


@pytest.mark.parametrize("name", ["resnet18", "convnextv2_atto"])
def test_sparse_equals_dense_masked_bf16(name):
    sparse = sparse_mim.create_backbone(name, sparse=True, drop_path_rate=0.0)
    randomize_weights_(sparse, torch.Generator().manual_seed(1))
    dense = sparse_mim.create_backbone(name, sparse=False, drop_path_rate=0.0)
    dense.load_state_dict(sparse.state_dict())
    plain = sparse_mim.create_backbone(name, sparse=None, drop_path_rate=0.0)
    images = torch.randn(2, 3, 64, 96)
    visible = random_visible_mask(2, 2, 3, 0.6, torch.Generator().manual_seed(3))
    for train in (True, False):
        assert_backbones_equivalent(sparse, dense, images, visible, train, reference=plain, autocast=torch.bfloat16)
    # both twins return maps of the same dtype, and the master weights' gradients stay fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dtypes = [[m.dtype for m in model(images, visible)] for model in (sparse, dense)]
    assert dtypes[0] == dtypes[1], dtypes
    for model in (sparse, dense):
        assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
