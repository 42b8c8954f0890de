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

__all__ = ["randomize_weights_", "random_visible_mask"]


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
