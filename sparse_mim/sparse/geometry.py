"""Site arithmetic shared by the sparse ops: kernel geometry, output sizes, coarse maps, neighbour tables.

Every op that reads a window of sites (convs, pools, the TF-"same" conv) and
every op that changes scale goes through these helpers, so the rules that keep
a sparse model on SparK's patch grid live in one place:

* `conv_geometry` / `pair`: a conv's (kernel, stride, padding, dilation) as
  int pairs ('same' / 'valid' padding resolved);
* `output_map`: None for stride 1 (the output sites are the input sites), else
  the coarse map; raises ``ValueError`` when the dense output size would leave
  the patch grid; `pooled_size` / `check_pool` do the same for pooling (torch's
  ``ceil_mode`` rule); `same_padding` is TF's 'same' padding of one side;
* `coarse_map`: the map at a stride-times coarser scale (the input mask
  subsampled), one mask object and one cache per scale of an image;
* `neighbour_table`: for every output site, the feature row each tap of its
  window reads (``N`` = a hidden site, ``N + 1`` = outside the map), built once
  per (scale, geometry) and kept in the map's cache; `row_lookup` is the
  site -> row table it reads.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..utils.misc import to_pair
from .tensor import SparseMap

__all__ = ["pair", "conv_geometry", "output_map", "coarse_map", "row_lookup", "neighbour_table", "pooled_size",
           "check_pool", "pool_stride", "same_padding"]


def pair(v) -> tuple[int, int]:
    """An int or a pair as (h, w) (kernel size, stride, padding or dilation)."""
    return to_pair(v, "a kernel size / stride / padding / dilation")


def conv_geometry(weight: Tensor, stride, padding, dilation):
    """(kernel, stride, padding, dilation) pairs of a conv with ``weight`` [O, C, kh, kw]; 'same' / 'valid' resolved."""
    kernel = (int(weight.shape[2]), int(weight.shape[3]))
    stride, dilation = pair(stride), pair(dilation)
    if isinstance(padding, str):
        if padding == "same" and stride == (1, 1):
            padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
        elif padding == "valid":
            padding = (0, 0)
        else:
            raise ValueError(f"unsupported padding {padding!r}")
    return kernel, stride, pair(padding), dilation


def output_map(x: SparseMap, kernel, stride, padding, dilation) -> SparseMap | None:
    """None for stride 1 (output sites = input sites), else the coarse map. Checks dense output sizes."""
    h, w = x.spatial_shape
    for size, k, s, p, d, name in ((h, kernel[0], stride[0], padding[0], dilation[0], "height"),
                                   (w, kernel[1], stride[1], padding[1], dilation[1], "width")):
        dense_out = (size + 2 * p - d * (k - 1) - 1) // s + 1
        if size % s or dense_out != size // s:
            raise ValueError(
                f"sparse conv/pool with kernel {kernel}, stride {stride}, padding {padding}, dilation {dilation} "
                f"maps {name} {size} to {dense_out}, not {size}/{s}: the sparse engine keeps the patch grid, so "
                "use 'same'-style padding ((k-1)//2 for odd k, 0 for k == stride)")
    if stride == (1, 1):
        return None
    return coarse_map(x, stride)


def coarse_map(x: SparseMap, stride: tuple[int, int], features: Tensor | None = None) -> SparseMap:
    """The map at ``stride`` times coarser scale: sites = the input mask subsampled by the stride.

    SparK's mask at every scale is the patch mask upsampled (nearest), so the
    coarse mask is ``mask[:, ::sh, ::sw]``. The result is cached in the input's
    cache: every strided op (conv, pool, main branch or shortcut) from the same
    input shares one mask object and one cache, hence one canonical row order.
    """
    sh, sw = stride
    key = ("coarse", sh, sw)
    entry = x.cache.get(key)
    if entry is None:
        h, w = x.spatial_shape
        if h % sh or w % sw:
            raise ValueError(f"a stride-{stride} op needs map sides divisible by the stride, got {h}x{w}; "
                             "use image sides that are multiples of 32")
        mask = x.mask[:, ::sh, ::sw].contiguous()
        empty = (~mask.flatten(1).any(1)).nonzero().flatten()
        if empty.numel():
            raise ValueError(f"stride {stride} leaves images {empty.tolist()} without an active site; the mask "
                             "must be the patch mask upsampled to this scale")
        f = x.patch_factor
        entry = (mask, {"patch_factor": f // sh if f % sh == 0 and sh == sw else 1})
        scales = x.cache.get("scales")  # one (mask, cache) per scale of the image (tensor.Scales)
        if scales is not None and f % sh == 0 and sh == sw:
            entry = scales.register(*entry)
        x.cache[key] = entry
    mask, cache = entry
    if features is None:  # a placeholder of the right shape (the op replaces it): no memory, no read-back
        n = cache.get("num_sites")
        if n is None:  # once per scale
            n = cache["num_sites"] = int(mask.sum())
        features = x.features.new_zeros(()).expand(n, x.num_channels)
    return SparseMap(features, mask, cache)


def row_lookup(x: SparseMap) -> Tensor:
    """[B*h*w] int32: the feature row of each site, ``N`` at hidden sites (cached per scale)."""
    lut = x.cache.get("row_lookup")
    if lut is None:
        n = x.num_sites
        # int32 rows (index_select / index_put_ take them) halve the memory of every table built from it
        dtype = torch.int32 if n + 2 < 2 ** 31 else torch.long
        lut = torch.full((x.mask.numel(),), n, dtype=dtype, device=x.mask.device)
        lut[x.flat_index] = torch.arange(n, device=x.mask.device, dtype=dtype)
        x.cache["row_lookup"] = lut
    return lut


def neighbour_table(x: SparseMap, out: SparseMap, kernel: tuple[int, int], stride: tuple[int, int],
                    padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    """[M, kh*kw] int32 rows of ``x`` read by each output site of ``out`` (N = hidden, N + 1 = outside).

    Taps are in (dy, dx) row-major order, the order of a torch weight's
    [kh, kw] dims. Cached in the input's cache, keyed by the geometry.
    """
    key = ("table", kernel, stride, padding, dilation)
    table = x.cache.get(key)
    if table is not None:
        return table
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    h, w = x.spatial_shape
    dev = x.mask.device
    idx = out.indices.long()
    b, oy, ox = idx[:, 0:1], idx[:, 1:2], idx[:, 2:3]
    ys = oy * sh - ph + torch.arange(kh, device=dev) * dh  # [M, kh]
    xs = ox * sw - pw + torch.arange(kw, device=dev) * dw  # [M, kw]
    inside = ((ys >= 0) & (ys < h))[:, :, None] & ((xs >= 0) & (xs < w))[:, None, :]
    lin = (b[:, :, None] * h + ys.clamp(0, h - 1)[:, :, None]) * w + xs.clamp(0, w - 1)[:, None, :]
    table = row_lookup(x)[lin]
    table = table.masked_fill_(~inside, x.num_sites + 1).view(idx.shape[0], kh * kw)
    x.cache[key] = table
    return table


def pooled_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """The output size ``F.avg_pool2d`` / ``F.max_pool2d`` give (torch's rule, ceil_mode included)."""
    span = size + 2 * p - d * (k - 1) - 1
    if not ceil_mode:
        return span // s + 1
    out = -(-span // s) + 1
    if (out - 1) * s >= size + p:
        out -= 1
    return out


def check_pool(x: SparseMap, kernel, stride, padding, dilation, ceil_mode: bool) -> None:
    """Raise ``ValueError`` unless the pooling keeps the patch grid of ``x`` (output side = side / stride)."""
    h, w = x.spatial_shape
    for size, k, s, p, d in zip((h, w), kernel, stride, padding, dilation):
        if pooled_size(size, k, s, p, d, ceil_mode) != size // s or size % s:
            raise ValueError(f"pooling with kernel {kernel}, stride {stride}, padding {padding} does not keep the "
                             f"patch grid of a {h}x{w} map")


def same_padding(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    """TF 'same' padding (as timm's ``pad_same``): (before, after) for one side."""
    total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


def pool_stride(kernel: tuple[int, int], stride) -> tuple[int, int]:
    """A pooling op's stride as a pair: the kernel size when ``stride`` is None or empty (torch's default)."""
    if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0):
        return kernel
    return pair(stride)
