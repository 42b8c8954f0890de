"""SparK under bf16 autocast: the sparse encoder equals its dense-masked reference (loss, reconstruction,
gradients), the loss is computed in fp32, and master weights / gradients stay fp32.

Tolerances, with bf16 unit roundoff u = 2^-8 (two roundings of nearly equal numbers are at
most one ulp, 2u, apart): the loss is an fp32 mean over thousands of squared errors, a
few ulp flips upstream move it far below 2u (measured: equal); reconstruction r = 4 ulps
(3.1e-2, max |a - b| / max |b|); per-parameter gradient norms: median r = 4, worst r = 8
(6.3e-2); measured: reconstructions equal or within 1 ulp, worst gradient 6e-3 (the
zero-initialised conv biases add nothing on either side; tests/backbones/test_backbone_amp.py
covers biases). Reconstruction and gradients in eval mode only: in train mode the
decoder's and the encoder's BN statistics over a handful of visible sites amplify a
single-ulp flip up to ~20% of the small reconstruction at init (bf16 against fp32 differs
by 28% there), at any precision (tests/spark/test_spark_equivalence.py); the train-mode
loss is checked.
"""
from __future__ import annotations

import pytest
import torch

from sparse_mim.spark import SparK

pytestmark = pytest.mark.usefixtures("one_torch_thread")

U = 2.0 ** -8


def _run(model, images, visible):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, rec, _ = model(images, visible)
    assert loss.dtype == torch.float32, "the SparK loss must be reduced in fp32 under autocast"
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), rec.detach().float(), grads


@pytest.mark.parametrize("name", ["resnet18", "convnextv2_atto"])
def test_spark_bf16_sparse_equals_dense_reference(name):
    torch.manual_seed(0)
    sparse = SparK(name, input_size=(64, 64), decoder_width=64, drop_path_rate=0.0, init="trunc_normal")
    dense = sparse.dense_reference()
    images = torch.randn(2, 3, 64, 64)
    visible = sparse.mask(2, generator=torch.Generator().manual_seed(2))
    # eval first: a train-mode step moves the BN running statistics of both models, and over the few
    # visible sites a one-ulp bf16 difference there is amplified (see above), which eval would inherit
    for train in (False, True):
        sparse.train(train), dense.train(train)
        ls, rs, gs = _run(sparse, images, visible)
        ld, rd, gd = _run(dense, images, visible)
        assert torch.isfinite(ls) and abs(float(ls - ld)) <= 2 * U * abs(float(ld)), (float(ls), float(ld))
        if train:
            continue
        assert float((rs - rd).abs().max() / rd.abs().max()) <= 4 * 2 * U
        assert set(gs) == set(gd) and len(gs) > 0
        assert all(p.dtype == torch.float32 for p in sparse.parameters())
        errs = sorted(float((gs[n] - gd[n]).norm() / gd[n].norm().clamp_min(1e-30)) for n in gd)
        assert all(g.dtype == torch.float32 for g in gs.values())
        assert errs[len(errs) // 2] <= 4 * 2 * U and errs[-1] <= 8 * 2 * U, (errs[len(errs) // 2], errs[-1])


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
