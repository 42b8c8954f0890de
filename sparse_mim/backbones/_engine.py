"""The one place where backbones meet the sparse engine (`sparse_mim.sparse`).

Kept separate so that the engine's API can change in one file: `sparsify`,
`dense_masked`, `active_mask` and `current_mask` are all the backbones use.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn


def _engine():
    try:
        from ..sparse import convert
    except ImportError as e:  # the engine is a separate part of the project
        raise ImportError(f"sparse_mim.sparse.convert is not available ({e}); the sparse engine is needed to "
                          "convert a backbone") from e
    return convert


def sparsify(model: nn.Module) -> nn.Module:
    return _engine().sparsify(model)


def dense_masked(model: nn.Module) -> nn.Module:
    return _engine().dense_masked(model)


def active_mask(visible: Tensor):
    return _engine().active_mask(visible)


def current_mask(hw: tuple[int, int]) -> Optional[Tensor]:
    """The active visible mask upsampled to ``hw`` = (h, w), or None outside `active_mask`."""
    visible = _engine().current_mask()
    if visible is None:
        return None
    from ..sparse.tensor import check_visible_mask, upsample_mask

    return upsample_mask(visible, check_visible_mask(visible, hw[0], hw[1]))
