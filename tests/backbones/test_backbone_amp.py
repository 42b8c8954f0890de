"""Sparse backbones == dense-masked twins under bf16 autocast (feature maps, input and weight gradients).

Same fp32 weights on both sides, autocast casts them alike; the twins differ only where
a result lands on the other side of a bf16 rounding boundary. bf16 unit roundoff
u = 2^-8 (3.9e-3); two roundings of nearly equal numbers differ by at most one ulp, 2u.
The sparse conv adds its bias after the GEMM (one rounding more than the dense conv,
which adds it inside), so a net with conv biases (ConvNeXt) carries ~1 ulp of difference
per layer, which later layers neither grow nor remove much (measured: feature maps
<= 1.3e-2, per-parameter gradient norm <= 4.2e-2, median 1.7e-2); without conv biases
(ResNet) the twins agree bit for bit in the forward and to 5e-3 in the gradients.

Tolerances (r ulps of 2u): feature maps and input gradient r = 4 (3.1e-2, max |a - b| /
max |b|); per-parameter gradient norms r = 4 for the median parameter and r = 8
(6.3e-2) for the worst one (a bias gradient summed over sites with cancellation). For
scale: the same bf16 gradients differ from fp32 by 10-40% on these small random nets,
and a real mismatch (a missing tap, a hidden site leaking in) is O(1). Gradients are
compared in eval mode: train-mode BatchNorm over the few visible sites at stride 32
makes them ill-conditioned at any precision (see test_backbone.py), its forward is checked.
"""
import pytest
import torch

import sparse_mim
from sparse_mim.testing import max_relative_error, random_visible_mask, randomize_weights_, relative_error

pytestmark = pytest.mark.usefixtures("one_torch_thread")

U = 2.0 ** -8
TOL_MAP = 4 * 2 * U
TOL_GRAD_MEDIAN = 4 * 2 * U
TOL_GRAD_WORST = 8 * 2 * U


def _max_rel(a, b):  # on float copies: a difference of two bf16 tensors is itself rounded to bf16
    return max_relative_error(a.detach().float(), b.detach().float(), floor=1e-30)


def _norm_rel(a, b):
    return relative_error(a.detach().float(), b.detach().float())


def _run(model, images, visible, train):
    model.train(train)
    model.zero_grad(set_to_none=True)
    x = images.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = model(x, visible)
    g = torch.Generator().manual_seed(5)
    sum((f.float() * torch.randn(f.shape, generator=g)).sum() for f in feats).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return [f.detach() for f in feats], x.grad, grads


@pytest.mark.parametrize("name", ["resnet18", "convnextv2_atto"])
def test_sparse_equals_dense_masked_bf16(name):
    sparse = sparse_mim.create_backbone(name, sparse=True, drop_path_rate=0.0)
    randomize_weights_(sparse, torch.Generator().manual_seed(1))
    dense = sparse_mim.create_backbone(name, sparse=False, drop_path_rate=0.0)
    dense.load_state_dict(sparse.state_dict())
    images = torch.randn(2, 3, 64, 96)
    visible = random_visible_mask(2, 2, 3, 0.6, torch.Generator().manual_seed(3))
    for train in (True, False):
        fs, gxs, gs = _run(sparse, images, visible, train)
        fd, gxd, gd = _run(dense, images, visible, train)
        for i, (a, b) in enumerate(zip(fs, fd)):
            assert a.dtype == b.dtype, (i, a.dtype, b.dtype)
            assert _max_rel(a, b) <= TOL_MAP, f"map {i} (train={train}): {_max_rel(a, b):.2e}"
        if train:
            continue
        assert gxs.dtype == torch.float32 and _max_rel(gxs, gxd) <= TOL_MAP
        assert set(gs) == set(gd)
        errs = sorted(_norm_rel(gs[n], gd[n]) for n in gd)
        assert all(gs[n].dtype == torch.float32 for n in gs)
        assert errs[len(errs) // 2] <= TOL_GRAD_MEDIAN, f"median gradient difference {errs[len(errs) // 2]:.2e}"
        assert errs[-1] <= TOL_GRAD_WORST, f"worst gradient difference {errs[-1]:.2e}"
    # BN running statistics (fp32 buffers) were updated alike in the train-mode pass
    buffers = dict(dense.named_buffers())
    for n, b in sparse.named_buffers():
        if b.is_floating_point():
            assert b.dtype == torch.float32 and _max_rel(b, buffers[n]) <= TOL_MAP, n
