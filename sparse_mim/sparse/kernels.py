"""Sparse kernels beyond the plain / depthwise convs of `functional`: grouped conv, average pooling,
global spatial reductions. Each equals its dense-masked twin (the dense op on the zero-filled map, output
masked), forward and backward.

* grouped conv (ResNeXt, RegNet; any groups, strided or not, depthwise with a
  channel multiplier too): the neighbour table gathers an im2col block
  [M, k, groups, C/groups]; one batched GEMM per group (``einsum`` -> ``bmm``)
  multiplies it with the weight viewed as [groups, O/groups, C/groups, k]. A 1x1
  stride-1 grouped conv needs no gather.
* average pooling: the same table, a sum over the taps (hidden sites and
  padding read 0), divided per output site exactly as ``F.avg_pool2d`` divides
  on the zero-filled map: the window size including padding
  (``count_include_pad=True``), the taps inside the map, hidden ones included
  (``False``), or ``divisor_override``. ``ceil_mode`` is fine where it gives the
  floor size (even sides).
* global reductions over H, W (``mean``, ``sum``, ``amax``, ``amin``,
  ``adaptive_avg_pool2d(1)``): per-sample segment reductions of the rows; the
  mean divides by all H*W sites (hidden sites are zeros), the max / min also
  see a 0 where a sample has hidden sites. So squeeze-excitation gates equal
  the dense-masked ones.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import functional as SF
from . import report
from .tensor import SparseMap

__all__ = ["off_grid", "conv2d", "conv2d_same", "grouped_conv2d", "grouped_gather", "avg_pool2d", "max_pool2d", "spatial_reduce",
           "is_depthwise"]


def off_grid(error: Exception) -> bool:
    """Whether ``error`` says that an op's geometry leaves the patch grid (then the exact fallback runs it)."""
    text = str(error)
    return isinstance(error, ValueError) and any(
        k in text for k in ("patch grid", "unsupported padding", "divisible by the stride", "without an active site"))


def is_depthwise(c_in: int, weight: Tensor, groups: int) -> bool:
    return groups == c_in and weight.shape[0] == c_in and weight.shape[1] == 1


def conv2d(x: SparseMap, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
           groups: int = 1) -> SparseMap:
    """``F.conv2d`` on a sparse map, any groups (counts its MACs for `report`)."""
    c_in = x.num_channels
    if groups != 1 and not is_depthwise(c_in, weight, groups):
        out = grouped_conv2d(x, weight, bias, stride, padding, dilation, groups)
    else:
        out = SF.conv2d(x, weight, bias, stride, padding, dilation, groups)
    report.record("conv2d", out.num_sites * weight[0].numel() * weight.shape[0], "sparse")
    return out


def grouped_gather(features: Tensor, weight: Tensor, table: Tensor | None, groups: int) -> Tensor:
    """Grouped conv of [N, C] rows: ``table`` [M, k] (None for a 1x1 stride-1 conv), weight [O, C/g, kh, kw].

    Returns the [M, O] output rows (no bias).
    """
    n, c = features.shape
    o, cg = weight.shape[0], weight.shape[1]
    g = groups
    if c != cg * g or o % g:
        raise ValueError(f"grouped conv weight {tuple(weight.shape)} with groups={g} does not fit {c} input channels")
    og = o // g
    k = weight.shape[2] * weight.shape[3]
    w = weight.reshape(g, og, cg, k)
    if table is None:
        cols = features.view(n, 1, g, cg)
    else:
        m = table.shape[0]
        cols = SF.gather_rows(SF._padded(features), table.reshape(-1)).view(m, k, g, cg)
    return torch.einsum("mkgc,gock->mgo", cols, w).reshape(cols.shape[0], o)


def grouped_conv2d(x: SparseMap, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
                   groups: int = 1) -> SparseMap:
    """Sparse twin of ``F.conv2d`` with ``groups`` > 1 (weight [O, C/groups, kh, kw]); per-group gather-GEMM."""
    if not isinstance(x, SparseMap):
        raise TypeError(f"sparse grouped conv expects a SparseMap, got {type(x).__name__}")
    SF._check_devices(x, weight, bias)
    kernel, stride, padding, dilation = SF._geometry(weight, stride, padding, dilation)
    c_in = x.num_channels
    if weight.shape[1] * groups != c_in:
        raise ValueError(f"conv weight {tuple(weight.shape)} with groups={groups} expects "
                         f"{weight.shape[1] * groups} input channels, the sparse map has {c_in}")
    out_map = SF._output_map(x, kernel, stride, padding, dilation)
    target = x if out_map is None else out_map
    dtype = SF._compute_dtype(x.features, weight)
    features, weight = x.features.to(dtype), weight.to(dtype)
    if kernel == (1, 1) and out_map is None:
        table = None
    else:
        table = SF.neighbour_table(x, target, kernel, stride, padding, dilation)
    out = grouped_gather(features, weight, table, groups)
    if bias is not None:
        out = out + bias.to(dtype)
    return target.replace_features(out)


def _same_pad_before(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    """TF 'same' padding (as timm's ``pad_same``): (before, after) for one side."""
    total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


def conv2d_same(x: SparseMap, weight: Tensor, bias: Tensor | None = None, stride=1, dilation=1,
                groups: int = 1) -> SparseMap:
    """TF-'same' conv (timm's ``Conv2dSame``: asymmetric zero padding, then a 'valid' conv) on the active sites.

    With sides divisible by the stride the output has H/stride x W/stride sites, the coarse mask; the
    padding only shifts the window (``before`` sites), and taps beyond the map read 0, so the neighbour
    table with that offset gives the dense-masked numbers, strided, grouped and depthwise alike.
    """
    kernel = (int(weight.shape[2]), int(weight.shape[3]))
    stride, dilation = SF._pair(stride), SF._pair(dilation)
    h, w = x.spatial_shape
    if h % stride[0] or w % stride[1]:
        raise ValueError(f"a TF-'same' conv with stride {stride} keeps the patch grid only for sides divisible by "
                         f"the stride, got {h}x{w}")
    pads = [_same_pad_before(n, k, s, d) for n, k, s, d in zip((h, w), kernel, stride, dilation)]
    before = (pads[0][0], pads[1][0])
    if all(b == a for b, a in pads):  # symmetric: the ordinary sparse conv
        return conv2d(x, weight, bias, stride, before, dilation, groups)
    SF._check_devices(x, weight, bias)
    target = x if stride == (1, 1) else SF.coarse_map(x, stride)
    table = SF.neighbour_table(x, target, kernel, stride, before, dilation)
    dtype = SF._compute_dtype(x.features, weight)
    features, weight = x.features.to(dtype), weight.to(dtype)
    c_in = x.num_channels
    if groups == 1:
        if weight.shape[1] != c_in:
            raise ValueError(f"conv weight {tuple(weight.shape)} expects {weight.shape[1]} input channels, the "
                             f"sparse map has {c_in}")
        weight2d = weight.permute(2, 3, 1, 0).reshape(kernel[0] * kernel[1] * c_in, weight.shape[0])
        out = SF._GatherGemmConv.apply(features, weight2d, table, False)
    elif is_depthwise(c_in, weight, groups):
        out = SF._DepthwiseConv.apply(features, weight.flatten(1).t(), table.t().contiguous(), False)
    else:
        out = grouped_gather(features, weight, table, groups)
    if bias is not None:
        out = out + bias.to(dtype)
    report.record("conv2d", out.shape[0] * weight[0].numel() * weight.shape[0], "sparse")
    return target.replace_features(out)


# ---------------------------------------------------------------------------------------------------- pooling
def _pooled_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """The output size ``F.avg_pool2d`` / ``F.max_pool2d`` give (torch's rule, ceil_mode included)."""
    span = size + 2 * p - d * (k - 1) - 1
    if not ceil_mode:
        return span // s + 1
    out = -(-span // s) + 1
    if (out - 1) * s >= size + p:
        out -= 1
    return out


def _check_pool(x: SparseMap, kernel, stride, padding, dilation, ceil_mode: bool) -> None:
    h, w = x.spatial_shape
    for size, k, s, p, d in zip((h, w), kernel, stride, padding, dilation):
        if _pooled_size(size, k, s, p, d, ceil_mode) != size // s or size % s:
            raise ValueError(f"pooling with kernel {kernel}, stride {stride}, padding {padding} does not keep the "
                             f"patch grid of a {h}x{w} map")


def _avg_divisor(x: SparseMap, table: Tensor, kernel, stride, padding, count_include_pad: bool) -> Tensor:
    """[M, 1] divisor of every output site, as F.avg_pool2d computes it (cached per geometry)."""
    key = ("avg_divisor", kernel, stride, padding, count_include_pad, table.shape[0])
    div = x.cache.get(key)
    if div is not None:
        return div
    if not count_include_pad:
        div = (table != x.num_sites + 1).sum(1, keepdim=True)  # taps inside the map (hidden ones count)
    else:  # taps inside the padded map: [-p, size + p)
        (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
        h, w = x.spatial_shape
        out_h, out_w = h // sh, w // sw
        dev = x.mask.device
        ys = torch.arange(out_h, device=dev)[:, None] * sh - ph + torch.arange(kh, device=dev)
        xs = torch.arange(out_w, device=dev)[:, None] * sw - pw + torch.arange(kw, device=dev)
        ny = (ys < h + ph).sum(1)
        nx = (xs < w + pw).sum(1)
        per_site = (ny[:, None] * nx[None, :])  # [out_h, out_w]
        target = x if (sh, sw) == (1, 1) else SF.coarse_map(x, (sh, sw))
        idx = target.indices.long()
        div = per_site[idx[:, 1], idx[:, 2]][:, None]
    x.cache[key] = div
    return div


def avg_pool2d(x: SparseMap, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
               count_include_pad: bool = True, divisor_override: int | None = None) -> SparseMap:
    """Sparse twin of ``F.avg_pool2d`` on the zero-filled map (hidden sites read 0 and count in the window)."""
    kernel = SF._pair(kernel_size)
    stride = kernel if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0) else SF._pair(stride)
    padding, dilation = SF._pair(padding), (1, 1)
    _check_pool(x, kernel, stride, padding, dilation, ceil_mode)
    out_map = SF._output_map(x, kernel, stride, padding, dilation)
    target = x if out_map is None else out_map
    table = SF.neighbour_table(x, target, kernel, stride, padding, dilation)
    m, k = table.shape
    c = x.num_channels
    cols = SF.gather_rows(SF._padded(x.features), table.reshape(-1)).view(m, k, c)
    sums = cols.sum(1)
    if divisor_override:
        out = sums / divisor_override
    else:
        out = sums / _avg_divisor(x, table, kernel, stride, padding, count_include_pad).to(sums.dtype)
    report.record("avg_pool2d", m * k * c, "sparse")
    return target.replace_features(out)


def max_pool2d(x: SparseMap, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False) -> SparseMap:
    """``F.max_pool2d`` on the zero-filled map (`functional.max_pool2d`), ceil_mode where it gives the floor size."""
    kernel = SF._pair(kernel_size)
    stride_ = kernel if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0) else SF._pair(stride)
    _check_pool(x, kernel, stride_, SF._pair(padding), SF._pair(dilation), ceil_mode)
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
