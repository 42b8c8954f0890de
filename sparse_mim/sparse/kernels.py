"""The sparse ops as the torch dispatch and the sparse layers run them: each counts its multiply-adds.

`functional` computes every op (each equals its dense-masked twin, forward and
backward); the functions here are what `dispatch` (``F.*`` calls on a map) and
`nn` (the sparse layers) call, and record the MACs of each op under the running
module for `report`:

* ``conv2d`` (any groups: plain, depthwise, grouped as in ResNeXt / RegNet,
  depthwise with a channel multiplier), ``conv2d_same`` (timm's TF-'same'
  conv), ``avg_pool2d`` (``count_include_pad``, ``divisor_override``,
  ``ceil_mode`` where it gives the floor size) and ``max_pool2d``;
* global reductions over H, W (``mean``, ``sum``, ``amax``, ``amin``,
  ``adaptive_avg_pool2d(1)``): per-sample segment reductions of the rows; the
  mean divides by all H*W sites (hidden sites are zeros), the max / min also
  see a 0 where a sample has hidden sites. So squeeze-excitation gates equal
  the dense-masked ones.

A geometry that leaves the patch grid raises ``ValueError`` (`off_grid` tells
those errors apart); the callers then run the op through the exact fallback.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import functional as SF
from . import report
from .functional import grouped_conv2d, grouped_gather, is_depthwise
from .geometry import check_pool, pair, pool_stride
from .tensor import SparseMap

__all__ = ["off_grid", "conv2d", "conv2d_same", "grouped_conv2d", "grouped_gather", "avg_pool2d", "max_pool2d",
           "spatial_reduce", "is_depthwise"]


def off_grid(error: Exception) -> bool:
    """Whether ``error`` says that an op's geometry leaves the patch grid (then the exact fallback runs it)."""
    text = str(error)
    return isinstance(error, ValueError) and any(
        k in text for k in ("patch grid", "unsupported padding", "divisible by the stride", "without an active site"))


def _record_conv(out: SparseMap, weight: Tensor) -> SparseMap:
    report.record("conv2d", out.num_sites * weight[0].numel() * weight.shape[0], "sparse")
    return out


def conv2d(x: SparseMap, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
           groups: int = 1) -> SparseMap:
    """``F.conv2d`` on a sparse map, any groups (`functional.conv2d`; counts its MACs for `report`)."""
    return _record_conv(SF.conv2d(x, weight, bias, stride, padding, dilation, groups), weight)


def conv2d_same(x: SparseMap, weight: Tensor, bias: Tensor | None = None, stride=1, dilation=1,
                groups: int = 1) -> SparseMap:
    """timm's TF-'same' conv on a sparse map (`functional.conv2d_same`; counts its MACs for `report`)."""
    return _record_conv(SF.conv2d_same(x, weight, bias, stride, dilation, groups), weight)


def avg_pool2d(x: SparseMap, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
               count_include_pad: bool = True, divisor_override: int | None = None) -> SparseMap:
    """``F.avg_pool2d`` on the zero-filled map (`functional.avg_pool2d`; counts its MACs for `report`)."""
    out = SF.avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    kernel = pair(kernel_size)
    report.record("avg_pool2d", out.num_sites * kernel[0] * kernel[1] * x.num_channels, "sparse")
    return out


def max_pool2d(x: SparseMap, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False) -> SparseMap:
    """``F.max_pool2d`` on the zero-filled map (`functional.max_pool2d`), ceil_mode where it gives the floor size."""
    kernel = pair(kernel_size)
    stride_ = pool_stride(kernel, stride)
    check_pool(x, kernel, stride_, pair(padding), pair(dilation), ceil_mode)
    out = SF.max_pool2d(x, kernel, stride_, padding, dilation)
    report.record("max_pool2d", out.num_sites * kernel[0] * kernel[1] * x.num_channels, "sparse")
    return out


# ---------------------------------------------------------------------------------------------------- reductions
def spatial_reduce(x: SparseMap, op: str) -> Tensor:
    """Per-sample reduction over all H*W sites of the zero-filled map: [B, *channel dims].

    ``op``: ``"sum"``, ``"mean"`` (divides by H*W), ``"amax"`` / ``"amin"`` (a
    sample with hidden sites also sees a 0).
    """
    feats = x.features
    cshape = feats.shape[1:]
    flat = feats.reshape(feats.shape[0], -1)
    lengths = x.sites_per_sample
    h, w = x.spatial_shape
    if op in ("sum", "mean"):
        out = SF.segment_reduce(x, flat, "sum")  # unsafe=True: valid by construction, no read-back
        if op == "mean":
            out = out / (h * w)
    elif op in ("amax", "amin"):
        out = SF.segment_reduce(x, flat, "max" if op == "amax" else "min")
        hidden = (lengths < h * w)[:, None]  # applied unconditionally: deciding "any hidden?" would be a read-back
        zero = torch.zeros((), dtype=out.dtype, device=out.device)
        out = torch.where(hidden, torch.maximum(out, zero) if op == "amax" else torch.minimum(out, zero), out)
    else:
        raise ValueError(f"unknown spatial reduction {op!r}")
    return out.reshape((x.batch_size,) + tuple(cshape))
