"""Helpers for equivalence tests: weights that make every layer matter, random patch masks.

Freshly initialised backbones hide bugs: ConvNeXt's layer scale starts at 1e-6 (the
residual branch is invisible next to the shortcut), V2's GRN starts at zero (identity),
BatchNorm's running statistics are 0 / 1 and LayerNorm's affine is 1 / 0. A test that
compares sparse and dense outputs must randomise all of them.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["randomize_weights_", "random_visible_mask", "assert_equivalent", "relative_error"]


@torch.no_grad()
def randomize_weights_(model: nn.Module, generator: Optional[torch.Generator] = None, scale: float = 1.0) -> nn.Module:
    """Give every parameter and BN buffer values of order 1 so each layer changes the output.

    Conv / linear weights get a fan-in scaled normal (keeps activations O(1) through
    deep nets); norm affines, layer scales and GRN parameters get values around 1 / 0
    with a spread; BN running means / variances get non-trivial statistics.
    """
    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    for name, p in model.named_parameters():
        if p.dim() > 1:  # conv [O, I, kh, kw] or linear [O, I]
            fan_in = p[0].numel()
            p.copy_(randn(*p.shape) * (scale / fan_in) ** 0.5)
        elif name.endswith("bias"):
            p.copy_(0.2 * randn(*p.shape))
        else:  # norm weights, layer-scale gamma, GRN weight: around 1
            p.copy_(1.0 + 0.3 * randn(*p.shape))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(0.2 * randn(*m.running_mean.shape))
            m.running_var.copy_(0.5 + torch.rand(*m.running_var.shape, generator=generator))
            m.num_batches_tracked.fill_(10)
    return model


def random_visible_mask(batch: int, height: int, width: int, mask_ratio: float = 0.6,
                        generator: Optional[torch.Generator] = None) -> Tensor:
    """SparK's mask: every image keeps exactly round(h*w*(1-mask_ratio)) patches (at least 1). True = visible."""
    n = height * width
    keep = max(1, round(n * (1 - mask_ratio)))
    order = torch.rand(batch, n, generator=generator).argsort(dim=1)[:, :keep]
    visible = torch.zeros(batch, n, dtype=torch.bool)
    visible.scatter_(1, order, True)
    return visible.view(batch, height, width)


def relative_error(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b||."""
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_equivalent(sparse: nn.Module, dense: nn.Module, images: Tensor, visible: Tensor, train: bool,
                      tol: float = 1e-4) -> None:
    """Assert that a sparse backbone equals its dense-masked twin (same weights) on one batch.

    Checks the four maps (shapes, zeros at hidden sites, relative error < ``tol``), the
    gradient of a scalar loss that weighs every site differently w.r.t. every trainable
    parameter (relative per parameter, with a floor of 1e-3 * tol of the total gradient
    norm for gradients that are ~0 analytically), and, in train mode, the BN running
    statistics after the step.
    """
    sparse.train(train)
    dense.train(train)
    sparse.zero_grad(set_to_none=True)
    dense.zero_grad(set_to_none=True)
    out_s, out_d = sparse(images, visible), dense(images, visible)
    num_maps = len(sparse.channels)
    assert len(out_s) == len(out_d) == num_maps
    for i, (a, b) in enumerate(zip(out_s, out_d)):
        stride = sparse.downsample_ratio // 2 ** (num_maps - 1 - i)
        assert a.shape == b.shape == (images.shape[0], sparse.channels[i], images.shape[2] // stride,
                                      images.shape[3] // stride)
        factor = a.shape[-1] // visible.shape[-1]
        hidden = ~visible.repeat_interleave(factor, 1).repeat_interleave(factor, 2)
        if hidden.any():
            assert a.permute(0, 2, 3, 1)[hidden].abs().max() == 0, f"map {i}: non-zero hidden sites (sparse)"
            assert b.permute(0, 2, 3, 1)[hidden].abs().max() == 0, f"map {i}: non-zero hidden sites (dense)"
        err = relative_error(a, b)
        assert err < tol, f"map {i} (stride {stride}): relative error {err:.2e}"
    # a scalar loss that weighs every site and channel differently
    weights = [torch.randn(o.shape, dtype=o.dtype, generator=torch.Generator().manual_seed(7 + i))
               for i, o in enumerate(out_d)]
    sum((o * w).sum() for o, w in zip(out_s, weights)).backward()
    sum((o * w).sum() for o, w in zip(out_d, weights)).backward()
    grads_d = {n: p.grad for n, p in dense.named_parameters() if p.requires_grad}
    total = torch.stack([g.norm() for g in grads_d.values()]).norm()
    for n, p in sparse.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad is not None, f"{n} got no gradient in the sparse backbone"
        err = (p.grad - grads_d[n]).norm()
        # relative per parameter, with a floor for gradients that are ~0 analytically
        assert err <= tol * grads_d[n].norm() + 1e-3 * tol * total, \
            f"gradient of {n}: error {err:.2e}, norm {grads_d[n].norm():.2e}"
    if train:
        buffers_d = dict(dense.named_buffers())
        for n, b in sparse.named_buffers():
            if b.is_floating_point():
                assert relative_error(b, buffers_d[n]) < tol, f"buffer {n} differs after a training step"
