"""How a backbone is converted: the sparse engine's conversion API (`sparse_mim.sparse.convert`) as backbones use it.

`sparsify` (sparse twin, in place), `dense_masked` (SparK's dense-masked
simulation), `active_mask` (the visible mask of a forward pass of the
simulation) and `current_mask` (that mask at a feature size) are all the
backbones take from the engine; kept in this one module so that the engine's
API can change in one place.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..sparse import convert
from ..sparse.tensor import check_visible_mask, upsample_mask


def sparsify(model: nn.Module) -> nn.Module:
    return convert.sparsify(model)


def dense_masked(model: nn.Module) -> nn.Module:
    return convert.dense_masked(model)


def active_mask(visible: Tensor):
    return convert.active_mask(visible)


def current_mask(hw: tuple[int, int]) -> Optional[Tensor]:
    """The active visible mask upsampled to ``hw`` = (h, w), or None outside `active_mask`."""
    visible = convert.current_mask()
    if visible is None:
        return None
    return upsample_mask(visible, check_visible_mask(visible, hw[0], hw[1]))
