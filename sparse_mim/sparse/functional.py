"""Sparse ops on `SparseMap`: each one equals its dense-masked twin.

The dense-masked twin of an op is the dense op run on the zero-filled map,
its output multiplied by the mask at the output scale (SparK's simulation).
Every op here computes only at active sites and returns the same numbers.

Convolutions use *neighbour tables*: for every output site, the row of each
of the k*k input sites its window reads, with two sentinel rows appended to the
features: row ``N`` for a hidden site inside the map (value 0, as in the
dense-masked simulation) and row ``N + 1`` for padding outside the map (0 for
convs, -inf for max-pool). A table is built once per (scale, kernel geometry)
and kept in ``SparseMap.cache``, so every layer at that scale reuses it.

* k x k stride-1 conv (submanifold), one of four exact paths chosen per op,
  shape and device (`_choose_path`, `set_conv_backend`):
  - "gather": gather the table into an im2col matrix [N, k*k*C] and run ONE
    GEMM with the weight reshaped to [k*k*C, out]. The neighbour relation of
    an odd 'same'-padded kernel is symmetric (site j is tap o of site i iff i
    is tap k*k-1-o of j), so the input gradient is again a gather + GEMM with
    the spatially flipped weight, no scatter;
  - "windows": one dense conv over the batch of visible patches, each grown by
    the kernel's halo (cheap when patches are large: 8x8 sites at stride 4);
  - "dense": the dense channels-last conv on the zero-filled map (torch's
    depthwise kernel beats any per-site gather on CPU);
  - "spconv": spconv's SubMConv2d (implicit GEMM on CUDA).
* strided conv: output sites are the coarser mask (the input mask subsampled
  by the stride), in canonical order; gather-GEMM, the input gradient is a
  scatter-add.
* 1x1 stride-1 conv: a linear map of the features.
* depthwise k x k on the gather path: per tap, a row gather and a per-channel
  multiply-add.
* other groups (ResNeXt, RegNet, depthwise with a channel multiplier):
  `grouped_conv2d`, one batched GEMM per group on the gathered table;
  timm's TF-'same' conv: `conv2d_same`, the table offset by the 'before' padding.
* pooling: `max_pool2d` (hidden sites read 0, padding -inf) and `avg_pool2d`
  (the divisor of ``F.avg_pool2d`` on the zero-filled map).

The site arithmetic (kernel geometry, output sizes, coarse maps, neighbour
tables) lives in `geometry`; `coarse_map` and `neighbour_table` are also
importable from here. Weights stay in torch layout [out, in, kh, kw]; all
layout changes happen here.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

from . import autotune, spconv_backend
from .geometry import (check_pool, coarse_map, conv_geometry, neighbour_table, output_map, pair, pool_stride,
                       row_lookup, same_padding)
from .tensor import SparseMap

__all__ = [
    "conv2d", "depthwise_conv2d", "max_pool2d", "batch_norm", "layer_norm", "global_response_norm",
    "global_avg_pool", "drop_path", "coarse_map", "neighbour_table", "set_conv_backend", "get_conv_backend",
    "gather_rows", "segment_reduce", "is_depthwise", "grouped_gather", "grouped_conv2d", "conv2d_same", "avg_pool2d",
]

def set_conv_backend(name: str) -> str:
    """Choose how the sparse convs pick their implementation; returns the previous mode.

    * ``"autotune"`` (default): the first time a configuration (op, shape,
      sparsity, dtype, device) is met, every exact implementation is timed,
      forward and backward, and the fastest is kept (`autotune`, docs/autotune.md);
    * ``"table"`` (alias ``"auto"``): fixed rules measured on a CPU, no timing
      (`_table_rule`);
    * ``"gather"``: neighbour-table gather into im2col + one GEMM (any scale);
    * ``"windows"``: dense conv on each visible patch plus its halo (needs a
      map built from a patch mask, ``patch_factor > 1``);
    * ``"dense"``: the dense channels-last conv on the zero-filled map, the
      output sites read back (what the dense-masked simulation computes,
      without the hidden-site outputs); strided convs too;
    * ``"spconv"``: spconv SubMConv2d (Native on CPU, implicit GEMM on CUDA;
      groups=1 only).
    A forced path applies to every op that has it; the others use their
    gather path. Every path gives the dense-masked result; the tests check each
    of them. 1x1 stride-1 convs are always a linear map.
    """
    return autotune.set_mode(name)


def get_conv_backend() -> str:
    return autotune.get_mode()


def _op_kind(kernel: tuple[int, int], stride: tuple[int, int], groups: int, c_in: int) -> str:
    """The autotuner's op kind of a conv: which implementations can compute it."""
    symmetric = stride == (1, 1) and kernel[0] % 2 == 1 and kernel[1] % 2 == 1  # odd 'same' stride-1 kernel
    if groups == 1:
        if kernel == (1, 1) and stride == (1, 1):
            return "pointwise"
        return "conv" if symmetric else "strided_conv"
    if groups == c_in:
        return "depthwise" if symmetric else "strided_depthwise"
    return "grouped_conv" if symmetric else "strided_grouped_conv"


def _table_rule(call: "autotune.OpCall") -> str:
    """The fixed choice (mode "table"): measured on CPU, batch 16, 40% visible; a guess on CUDA."""
    x, kernel, dilation = call.x, call.kernel, call.dilation
    if call.kind not in ("conv", "depthwise"):
        return "gather"
    depthwise = call.kind == "depthwise"
    f = x.patch_factor
    halo = (dilation[0] * (kernel[0] - 1), dilation[1] * (kernel[1] - 1))
    if x.features.is_cuda:
        # spconv's implicit GEMM for groups=1 up to 32 taps; cuDNN on the zero-filled map for depthwise (spconv
        # has no groups) and larger kernels. Not measured on a GPU: autotune measures instead.
        taps = kernel[0] * kernel[1]
        return "spconv" if not depthwise and taps <= 32 and spconv_backend.spconv_available() else "dense"
    window_cost = (f + halo[0]) * (f + halo[1]) / (f * f)  # dense MACs per visible site, relative
    if depthwise:
        # torch's channels-last depthwise kernel beats any gather of k*k rows per site; run it on the patch
        # windows where they are large (7x7 on 8x8 patches), else on the whole zero-filled map
        return "windows" if f > 1 and window_cost <= 3.1 else "dense"
    return "windows" if f > 1 and window_cost <= 1.6 else "gather"


def _choose_path(call: "autotune.OpCall") -> str:
    """The implementation of ``call`` under the current mode (`set_conv_backend`); tunes new configurations."""
    return autotune.choose(call)


# ---------------------------------------------------------------------------------------------------- index tables
def _padded(features: Tensor, outside: float = 0.0) -> Tensor:
    """Features with the two sentinel rows: hidden (0) and outside (``outside``)."""
    extra = features.new_zeros((2, features.shape[1]))
    if outside != 0.0:
        extra[1] = outside
    return torch.cat([features, extra], 0)


class _GatherRows(Function):
    """``source[index]`` along dim 0; backward scatters with ``index_put_(accumulate=True)``.

    (Autograd's own backward of ``index_select`` is ``index_add_``, which on CPU
    loops over rows one by one: several times slower here.)
    """

    @staticmethod
    def forward(ctx, source: Tensor, index: Tensor):
        ctx.save_for_backward(index)
        ctx.num_rows = source.shape[0]
        return torch.index_select(source, 0, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        acc = _acc_dtype(grad)  # a bf16 scatter-add rounds at every addition: accumulate in fp32
        out = grad.new_zeros((ctx.num_rows,) + tuple(grad.shape[1:]), dtype=acc)
        return out.index_put_((index,), grad.to(acc), accumulate=True).to(grad.dtype), None


def gather_rows(source: Tensor, index: Tensor) -> Tensor:
    """Differentiable ``torch.index_select(source, 0, index)`` with a fast scatter-add backward."""
    return _GatherRows.apply(source, index)


def _segment_sum(x: SparseMap, values: Tensor) -> Tensor:
    """[B, C] per-sample sums of [N, C] rows (rows are sorted by batch: a segment reduction, no scatter).

    Low-precision rows are summed in fp32 (``segment_reduce`` would accumulate in bf16 and lose
    everything past 256 equal terms); the result is fp32 then, callers cast.
    """
    return segment_reduce(x, values.to(_acc_dtype(values)), "sum")


def segment_reduce(x: SparseMap, values: Tensor, reduce: str) -> Tensor:
    """``torch.segment_reduce`` of ``values`` [N, ...] (rows of ``x``) per sample, with ``unsafe=True``.

    Without ``unsafe`` torch checks the lengths with two read-backs (``lengths.min().item()`` and
    ``lengths.sum().item() == N``, aten/src/ATen/native/SegmentReduce.cpp): two host-device
    synchronisations per call on CUDA, in every GRN and squeeze-excitation gate. Both checks hold by
    construction here: ``x.sites_per_sample`` counts the True entries of each sample's mask (>= 0), and a
    map's rows are exactly its mask's True entries, in canonical (batch-major) order (`SparseMap.from_sites`,
    `coarse_map`; ``replace_features`` refuses another row count), so the lengths sum to N.
    """
    return torch.segment_reduce(values, reduce, lengths=x.sites_per_sample, axis=0, unsafe=True)


_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def autocast_dtype_for(device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype active for ``device``'s type in this thread, or None when autocast is off."""
    dev = torch.device(device).type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def _acc_dtype(t: Tensor) -> torch.dtype:
    """fp32 for bf16 / fp16 tensors (sums and scatter-adds accumulate there, as torch's dense kernels do)."""
    return torch.float32 if t.dtype in _LOW_PRECISION else t.dtype


def _compute_dtype(features: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype a dense conv would compute in: autocast's if enabled for the device, else the input's.

    Autocast's rule: fp32 / fp16 / bf16 inputs are cast to the autocast dtype, float64 is left alone.
    """
    amp = autocast_dtype_for(features.device)
    if amp is not None and features.dtype in _AUTOCAST_ELIGIBLE:
        return amp
    return features.dtype


def _check_devices(x: SparseMap, *tensors: Tensor | None) -> None:
    for t in tensors:
        if t is not None and t.device != x.features.device:
            raise RuntimeError(f"sparse map is on {x.features.device} but a parameter is on {t.device}; "
                               "move the model and the input to the same device")


# ---------------------------------------------------------------------------------------------------- convolution
class _GatherGemmConv(Function):
    """out = im2col(x, table) @ weight2d.   weight2d: [K*C, O] (taps major, then input channels).

    ``symmetric`` marks a stride-1 odd 'same' kernel whose table is its own
    transpose up to tap reversal: the input gradient is then a gather + GEMM.
    """

    @staticmethod
    def forward(ctx, features: Tensor, weight2d: Tensor, table: Tensor, symmetric: bool):
        n, c = features.shape
        m, k = table.shape
        cols = torch.index_select(_padded(features), 0, table.view(-1)).view(m, k * c)
        ctx.save_for_backward(features, weight2d, table)
        ctx.symmetric = symmetric
        return cols @ weight2d

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        features, weight2d, table = ctx.saved_tensors
        n, c = features.shape
        m, k = table.shape
        o = weight2d.shape[1]
        grad_out = grad_out.contiguous()
        grad_in = grad_w = None
        if ctx.needs_input_grad[0]:
            if ctx.symmetric:
                w_t = weight2d.view(k, c, o).flip(0).transpose(1, 2).reshape(k * o, c)
                gcols = torch.index_select(_padded(grad_out), 0, table.view(-1)).view(n, k * o)
                grad_in = gcols @ w_t
            else:
                gcols = (grad_out @ weight2d.t()).view(m * k, c)
                acc = _acc_dtype(gcols)  # scatter-add in fp32 (bf16 would round at every addition)
                grad_in = features.new_zeros((n + 2, c), dtype=acc).index_put_(
                    (table.view(-1),), gcols.to(acc), accumulate=True)[:n].to(features.dtype)
        if ctx.needs_input_grad[1]:
            cols = torch.index_select(_padded(features), 0, table.view(-1)).view(m, k * c)
            grad_w = cols.t() @ grad_out
        return grad_in, grad_w, None, None


class _DepthwiseConv(Function):
    """out[i, c] = sum_t x[table[i, t], c] * weight[t, c]   (weight: [K, C])."""

    @staticmethod
    def forward(ctx, features: Tensor, weight: Tensor, table_t: Tensor, symmetric: bool):
        ctx.save_for_backward(features, weight, table_t)
        ctx.symmetric = symmetric
        return _depthwise_apply(_padded(features), weight, table_t)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        features, weight, table_t = ctx.saved_tensors
        n, c = features.shape
        k = table_t.shape[0]
        grad_out = grad_out.contiguous()
        grad_in = grad_w = None
        if ctx.needs_input_grad[0]:
            if ctx.symmetric:
                grad_in = _depthwise_apply(_padded(grad_out), weight.flip(0), table_t)
            else:
                acc = _acc_dtype(grad_out)
                grad_pad = features.new_zeros((n + 2, c), dtype=acc)
                for t in range(k):
                    grad_pad.index_put_((table_t[t],), (grad_out * weight[t]).to(acc), accumulate=True)
                grad_in = grad_pad[:n].to(features.dtype)
        if ctx.needs_input_grad[1]:
            acc = _acc_dtype(features)  # products and sums in fp32, as a dense conv's weight gradient
            xpad, g = _padded(features).to(acc), grad_out.to(acc)
            grad_w = torch.stack([(torch.index_select(xpad, 0, table_t[t]) * g).sum(0)
                                  for t in range(k)]).to(weight.dtype)
        return grad_in, grad_w, None, None


def _depthwise_apply(xpad: Tensor, weight: Tensor, table_t: Tensor) -> Tensor:
    k, m = table_t.shape
    acc = _acc_dtype(xpad)  # bf16 / fp16: the k*k-term sum accumulates in fp32, rounded once at the end
    out = torch.index_select(xpad, 0, table_t[0]).to(acc).mul_(weight[0])
    for t in range(1, k):
        out.addcmul_(torch.index_select(xpad, 0, table_t[t]), weight[t])
    return out.to(xpad.dtype)


def _patch_windows(x: SparseMap, halo: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor, tuple[int, int]]:
    """Tables for the per-patch dense path (cached per scale and halo).

    Returns ``window_rows`` [P * wh * ww] (feature rows of each visible patch's
    window incl. a halo of ``halo`` sites per side; N = hidden, N + 1 = outside),
    ``centre`` [N] (canonical row of each patch-major output site),
    ``to_canonical`` [N] (its inverse permutation) and the window size.
    """
    key = ("windows", halo)
    entry = x.cache.get(key)
    if entry is not None:
        return entry
    f = x.patch_factor
    h, w = x.spatial_shape
    dev = x.mask.device
    patches = x.mask[:, ::f, ::f].nonzero().long()  # [P, 3] visible patches, (b, py, px)
    b, py, px = patches[:, 0, None], patches[:, 1, None], patches[:, 2, None]
    wh, ww = f + 2 * halo[0], f + 2 * halo[1]
    ys = py * f - halo[0] + torch.arange(wh, device=dev)  # [P, wh]
    xs = px * f - halo[1] + torch.arange(ww, device=dev)  # [P, ww]
    inside = ((ys >= 0) & (ys < h))[:, :, None] & ((xs >= 0) & (xs < w))[:, None, :]
    lin = (b[:, :, None] * h + ys.clamp(0, h - 1)[:, :, None]) * w + xs.clamp(0, w - 1)[:, None, :]
    window_rows = row_lookup(x)[lin].masked_fill_(~inside, x.num_sites + 1)
    centre = window_rows[:, halo[0]:halo[0] + f, halo[1]:halo[1] + f].reshape(-1)  # patch-major -> canonical row
    if centre.numel() != x.num_sites or bool((centre >= x.num_sites).any()):
        raise RuntimeError("the mask is not constant on its patch_factor blocks; cannot use the windows path")
    to_canonical = torch.empty_like(centre)
    to_canonical[centre.long()] = torch.arange(centre.numel(), device=dev, dtype=centre.dtype)
    entry = (window_rows.view(-1), centre, to_canonical, (wh, ww))
    x.cache[key] = entry
    return entry


class _WindowsConv(Function):
    """Stride-1 conv per visible patch window; backward without any scatter.

    Input gradient: the same windows conv applied to the output gradient with
    the spatially flipped, in/out-transposed weight (the neighbour relation of
    an odd 'same' kernel is symmetric). Weight gradient: torch's conv weight
    gradient over the batch of windows.
    """

    @staticmethod
    def forward(ctx, features, weight, window_rows, centre, to_canonical, window, dilation, groups):
        ctx.save_for_backward(features, weight, window_rows, centre, to_canonical)
        ctx.window, ctx.dilation, ctx.groups = window, dilation, groups
        ctx.num_windows = window_rows.numel() // (window[0] * window[1])
        ctx.patch = int(round((features.shape[0] / ctx.num_windows) ** 0.5))
        return _windows_apply(features, weight, window_rows, to_canonical, window, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        features, weight, window_rows, centre, to_canonical = ctx.saved_tensors
        window, dilation, groups = ctx.window, ctx.dilation, ctx.groups
        grad_out = grad_out.contiguous()
        grad_in = grad_w = None
        if ctx.needs_input_grad[0]:
            w_t = weight.flip(2, 3)
            if groups == 1:
                w_t = w_t.transpose(0, 1)
            grad_in = _windows_apply(grad_out, w_t, window_rows, to_canonical, window, dilation, groups)
        if ctx.needs_input_grad[1]:
            p, f, o = ctx.num_windows, ctx.patch, grad_out.shape[1]
            g = torch.index_select(grad_out, 0, centre).view(p, f, f, o).permute(0, 3, 1, 2)
            xw = _windows_gather(features, window_rows, window)
            grad_w = torch.ops.aten.convolution_backward(
                g, xw, weight, None, [1, 1], [0, 0], list(dilation), False, [0, 0], groups, [False, True, False])[1]
        return grad_in, grad_w, None, None, None, None, None, None


def _windows_gather(features: Tensor, window_rows: Tensor, window: tuple[int, int]) -> Tensor:
    c = features.shape[1]
    return torch.index_select(_padded(features), 0, window_rows).view(-1, window[0], window[1], c).permute(0, 3, 1, 2)


def _windows_apply(features, weight, window_rows, to_canonical, window, dilation, groups) -> Tensor:
    out = F.conv2d(_windows_gather(features, window_rows, window), weight, None, 1, 0, dilation, groups)
    out = out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])  # patch-major rows (channels-last memory: a view)
    return torch.index_select(out, 0, to_canonical)


def _windows_conv(x: SparseMap, weight: Tensor, dilation: tuple[int, int], groups: int) -> Tensor:
    """Stride-1 conv as ONE dense conv over the visible patches, each with its halo of neighbours.

    Every output site lies in a visible patch; its window is the patch grown by
    the kernel's reach, filled from the features (0 at hidden / outside sites),
    so the dense conv (padding 0) over the batch of windows gives exactly the
    dense-masked outputs of the patch. The windows are channels-last in memory,
    which selects torch's fast CPU conv kernels.
    """
    kh, kw = weight.shape[2:]
    halo = (dilation[0] * (kh - 1) // 2, dilation[1] * (kw - 1) // 2)
    window_rows, centre, to_canonical, window = _patch_windows(x, halo)
    return _WindowsConv.apply(x.features, weight, window_rows, centre, to_canonical, window, dilation, groups)


def is_depthwise(c_in: int, weight: Tensor, groups: int) -> bool:
    """Whether a conv with ``groups`` and ``weight`` [O, C/groups, kh, kw] on ``c_in`` channels is depthwise (out == in)."""
    return groups == c_in and weight.shape[0] == c_in and weight.shape[1] == 1


def conv2d(x: SparseMap, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
           groups: int = 1) -> SparseMap:
    """Sparse twin of ``F.conv2d`` (torch weight layout [out, in/groups, kh, kw]).

    Any groups: 1 and depthwise (out == in) run on the autotuned paths, other groups on `grouped_conv2d`.
    """
    if not isinstance(x, SparseMap):
        raise TypeError(f"sparse conv2d expects a SparseMap, got {type(x).__name__}; build one with "
                        "SparseMap.from_dense(images, visible)")
    _check_devices(x, weight, bias)
    kernel, stride, padding, dilation = conv_geometry(weight, stride, padding, dilation)
    c_in = x.num_channels
    if groups != 1 and not is_depthwise(c_in, weight, groups):  # other groups: per-group gather-GEMM
        return grouped_conv2d(x, weight, bias, stride, padding, dilation, groups)
    if groups == 1 and weight.shape[1] != c_in:
        raise ValueError(f"conv weight {tuple(weight.shape)} expects {weight.shape[1]} input channels, the sparse "
                         f"map has {c_in}")
    out_map = output_map(x, kernel, stride, padding, dilation)
    dtype = _compute_dtype(x.features, weight)
    features = x.features.to(dtype)
    weight = weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    target = x if out_map is None else out_map

    kind = _op_kind(kernel, stride, groups, c_in)
    if kind == "pointwise":
        out = F.linear(features, weight.flatten(1), bias)  # pointwise: a linear map of the features
        return x.replace_features(out)
    call = autotune.OpCall(kind, x.replace_features(features), weight, kernel, stride, padding, dilation, groups,
                           target)
    out = autotune.run_candidate(call, _choose_path(call))
    if bias is not None:
        out = out + bias
    return target.replace_features(out)


# ---------------------------------------------------------------------------------------------------- conv candidates
# The exact implementations of each conv kind, registered with the autotuner (op kind -> name -> run). Each
# returns the output features (no bias) at ``call.target``'s sites, equal to the dense-masked simulation.
def _run_gather(call: "autotune.OpCall") -> Tensor:
    """Neighbour-table gather: im2col + one GEMM (groups=1), or a per-tap multiply-add (depthwise)."""
    x, weight, kernel = call.x, call.weight, call.kernel
    symmetric = call.kind in ("conv", "depthwise")
    table = neighbour_table(x, call.target, kernel, call.stride, call.padding, call.dilation)
    if call.groups == 1:
        k = kernel[0] * kernel[1]
        weight2d = weight.permute(2, 3, 1, 0).reshape(k * x.num_channels, weight.shape[0])
        return _GatherGemmConv.apply(x.features, weight2d, table, symmetric)
    table_t = x.cache.get(("table_t", id(table)))
    if table_t is None:  # per-tap contiguous rows for the depthwise loop
        table_t = table.t().contiguous()
        x.cache[("table_t", id(table))] = table_t
    return _DepthwiseConv.apply(x.features, weight.flatten(1).t(), table_t, symmetric)


def _run_windows(call: "autotune.OpCall") -> Tensor:
    return _windows_conv(call.x, call.weight, call.dilation, call.groups)


def _run_dense(call: "autotune.OpCall") -> Tensor:
    """The dense conv on the zero-filled map (channels-last in and out), read back at the output sites."""
    out = F.conv2d(call.x.dense(), call.weight, None, call.stride, call.padding, call.dilation, call.groups)
    return call.target.gather_sites(out.permute(0, 2, 3, 1))


def _run_spconv(call: "autotune.OpCall") -> Tensor:
    return spconv_backend.subm_conv2d(call.x, call.weight, call.dilation, call.padding)


def _spconv_usable(call: "autotune.OpCall") -> bool:
    return call.kind == "conv" and spconv_backend.spconv_supports(call.x.features)


for _kind in ("conv", "depthwise", "strided_conv", "strided_depthwise"):
    autotune.register_candidate(_kind, "gather", _run_gather)
    autotune.register_candidate(_kind, "dense", _run_dense)
    autotune.register_table_rule(_kind, _table_rule)
for _kind in ("conv", "depthwise"):
    autotune.register_candidate(_kind, "windows", _run_windows, lambda call: call.x.patch_factor > 1)
autotune.register_candidate("conv", "spconv", _run_spconv, _spconv_usable)


def _upcast(run):
    """The candidate ``run`` computed in fp32 on the exactly up-cast bf16 / fp16 inputs, output rounded back.

    bf16 x bf16 products are exact in fp32 and a low-precision conv accumulates in fp32 and rounds its
    output once, so this returns the low-precision conv's numbers up to the order of the fp32 sums
    (gradients are rounded back to the low dtype by the casts, as the low-precision conv's are). It pays
    where the low-precision kernel is slow: torch's CPU depthwise conv in bf16 runs 2-4x slower than in
    fp32 (fwd + bwd, measured at ConvNeXt-S shapes).
    """
    def run_fp32(call: "autotune.OpCall") -> Tensor:
        dtype = call.x.features.dtype
        c32 = dataclasses.replace(call, x=call.x.replace_features(call.x.features.float()), weight=call.weight.float())
        with torch.autocast(call.x.features.device.type, enabled=False):
            return run(c32).to(dtype)
    return run_fp32


def _low_precision(call: "autotune.OpCall") -> bool:
    return call.x.features.dtype in _LOW_PRECISION


autotune.register_candidate("depthwise", "dense_fp32", _upcast(_run_dense), _low_precision)
autotune.register_candidate("depthwise", "windows_fp32", _upcast(_run_windows),
                            lambda call: _low_precision(call) and call.x.patch_factor > 1)


def depthwise_conv2d(x: SparseMap, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
                     dilation=1) -> SparseMap:
    """Depthwise conv (weight [C, 1, kh, kw]), e.g. ConvNeXt's 7x7."""
    return conv2d(x, weight, bias, stride, padding, dilation, groups=x.num_channels)


# ---------------------------------------------------------------------------------------------------- grouped, TF-'same'
def grouped_gather(features: Tensor, weight: Tensor, table: Tensor | None, groups: int) -> Tensor:
    """Grouped conv of [N, C] rows: ``table`` [M, k] (None for a 1x1 stride-1 conv), weight [O, C/g, kh, kw].

    The neighbour table gathers an im2col block [M, k, groups, C/groups]; one
    batched GEMM per group (``einsum`` -> ``bmm``) multiplies it with the weight
    viewed as [groups, O/groups, C/groups, k]. Returns the [M, O] output rows (no bias).
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
        cols = gather_rows(_padded(features), table.reshape(-1)).view(m, k, g, cg)
    return torch.einsum("mkgc,gock->mgo", cols, w).reshape(cols.shape[0], o)


def grouped_conv2d(x: SparseMap, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
                   groups: int = 1) -> SparseMap:
    """Sparse twin of ``F.conv2d`` with ``groups`` > 1 (weight [O, C/groups, kh, kw]); per-group gather-GEMM.

    Any groups, strided or not, depthwise with a channel multiplier too (ResNeXt, RegNet, MobileNet); a 1x1
    stride-1 grouped conv needs no gather.
    """
    if not isinstance(x, SparseMap):
        raise TypeError(f"sparse grouped conv expects a SparseMap, got {type(x).__name__}")
    _check_devices(x, weight, bias)
    kernel, stride, padding, dilation = conv_geometry(weight, stride, padding, dilation)
    c_in = x.num_channels
    if weight.shape[1] * groups != c_in:
        raise ValueError(f"conv weight {tuple(weight.shape)} with groups={groups} expects "
                         f"{weight.shape[1] * groups} input channels, the sparse map has {c_in}")
    out_map = output_map(x, kernel, stride, padding, dilation)
    target = x if out_map is None else out_map
    dtype = _compute_dtype(x.features, weight)
    features, weight = x.features.to(dtype), weight.to(dtype)
    if kernel == (1, 1) and out_map is None:
        table = None
    else:
        table = neighbour_table(x, target, kernel, stride, padding, dilation)
    out = grouped_gather(features, weight, table, groups)
    if bias is not None:
        out = out + bias.to(dtype)
    return target.replace_features(out)


def conv2d_same(x: SparseMap, weight: Tensor, bias: Tensor | None = None, stride=1, dilation=1,
                groups: int = 1) -> SparseMap:
    """TF-'same' conv (timm's ``Conv2dSame``: asymmetric zero padding, then a 'valid' conv) on the active sites.

    With sides divisible by the stride the output has H/stride x W/stride sites, the coarse mask; the
    padding only shifts the window (``before`` sites), and taps beyond the map read 0, so the neighbour
    table with that offset gives the dense-masked numbers, strided, grouped and depthwise alike.
    """
    kernel = (int(weight.shape[2]), int(weight.shape[3]))
    stride, dilation = pair(stride), pair(dilation)
    h, w = x.spatial_shape
    if h % stride[0] or w % stride[1]:
        raise ValueError(f"a TF-'same' conv with stride {stride} keeps the patch grid only for sides divisible by "
                         f"the stride, got {h}x{w}")
    pads = [same_padding(n, k, s, d) for n, k, s, d in zip((h, w), kernel, stride, dilation)]
    before = (pads[0][0], pads[1][0])
    if all(b == a for b, a in pads):  # symmetric: the ordinary sparse conv
        return conv2d(x, weight, bias, stride, before, dilation, groups)
    _check_devices(x, weight, bias)
    target = x if stride == (1, 1) else coarse_map(x, stride)
    table = neighbour_table(x, target, kernel, stride, before, dilation)
    dtype = _compute_dtype(x.features, weight)
    features, weight = x.features.to(dtype), weight.to(dtype)
    c_in = x.num_channels
    if groups == 1:
        if weight.shape[1] != c_in:
            raise ValueError(f"conv weight {tuple(weight.shape)} expects {weight.shape[1]} input channels, the "
                             f"sparse map has {c_in}")
        weight2d = weight.permute(2, 3, 1, 0).reshape(kernel[0] * kernel[1] * c_in, weight.shape[0])
        out = _GatherGemmConv.apply(features, weight2d, table, False)
    elif is_depthwise(c_in, weight, groups):
        out = _DepthwiseConv.apply(features, weight.flatten(1).t(), table.t().contiguous(), False)
    else:
        out = grouped_gather(features, weight, table, groups)
    if bias is not None:
        out = out + bias.to(dtype)
    return target.replace_features(out)


# ---------------------------------------------------------------------------------------------------- pooling
def max_pool2d(x: SparseMap, kernel_size, stride=None, padding=0, dilation=1) -> SparseMap:
    """Sparse twin of ``F.max_pool2d`` on the zero-filled map: hidden neighbours count as 0, padding as -inf.

    So it equals the dense-masked simulation for inputs of any sign (SparK
    relies on non-negative inputs; this does not need to).
    """
    kernel = pair(kernel_size)
    stride = pool_stride(kernel, stride)
    padding, dilation = pair(padding), pair(dilation)
    out_map = output_map(x, kernel, stride, padding, dilation)
    target = x if out_map is None else out_map
    table = neighbour_table(x, target, kernel, stride, padding, dilation)
    m, k = table.shape
    cols = gather_rows(_padded(x.features, float("-inf")), table.view(-1)).view(m, k, -1)
    return target.replace_features(cols.max(1).values)


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
        target = x if (sh, sw) == (1, 1) else coarse_map(x, (sh, sw))
        idx = target.indices.long()
        div = per_site[idx[:, 1], idx[:, 2]][:, None]
    x.cache[key] = div
    return div


def avg_pool2d(x: SparseMap, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
               count_include_pad: bool = True, divisor_override: int | None = None) -> SparseMap:
    """Sparse twin of ``F.avg_pool2d`` on the zero-filled map (hidden sites read 0 and count in the window).

    The sum over the taps is divided per output site exactly as ``F.avg_pool2d``
    divides on the zero-filled map: the window size including padding
    (``count_include_pad=True``), the taps inside the map, hidden ones included
    (``False``), or ``divisor_override``. ``ceil_mode`` is fine where it gives the
    floor size (even sides).
    """
    kernel = pair(kernel_size)
    stride = pool_stride(kernel, stride)
    padding, dilation = pair(padding), (1, 1)
    check_pool(x, kernel, stride, padding, dilation, ceil_mode)
    out_map = output_map(x, kernel, stride, padding, dilation)
    target = x if out_map is None else out_map
    table = neighbour_table(x, target, kernel, stride, padding, dilation)
    m, k = table.shape
    c = x.num_channels
    cols = gather_rows(_padded(x.features), table.reshape(-1)).view(m, k, c)
    sums = cols.sum(1)
    if divisor_override:
        out = sums / divisor_override
    else:
        out = sums / _avg_divisor(x, table, kernel, stride, padding, count_include_pad).to(sums.dtype)
    return target.replace_features(out)


def global_avg_pool(x: SparseMap) -> Tensor:
    """Per-sample mean over the visible sites: [B, C]."""
    sums = _segment_sum(x, x.features)  # fp32 for low-precision features
    return (sums / x.sites_per_sample.to(sums.dtype)[:, None]).to(x.features.dtype)


# ---------------------------------------------------------------------------------------------------- normalisation
def batch_norm(x: SparseMap, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None = None,
               bias: Tensor | None = None, training: bool = False, momentum: float = 0.1,
               eps: float = 1e-5) -> SparseMap:
    """``F.batch_norm`` over the [N, C] visible rows: statistics over visible sites only."""
    return x.replace_features(F.batch_norm(x.features, running_mean, running_var, weight, bias, training, momentum, eps))


def layer_norm(x: SparseMap, normalized_shape, weight: Tensor | None, bias: Tensor | None, eps: float) -> SparseMap:
    """LayerNorm over channels at each site (channels-last LN and timm's LayerNorm2d alike)."""
    return x.replace_features(F.layer_norm(x.features, normalized_shape, weight, bias, eps))


def global_response_norm(x: SparseMap, weight: Tensor, bias: Tensor, eps: float = 1e-6) -> SparseMap:
    """ConvNeXt-V2 GRN per sample over its visible sites (timm's formula).

    g[b, c] = ||x[b, :, c]||_2 over the sample's sites, n = g / (mean_c g + eps),
    out = x + bias + weight * x * n.
    """
    feats = x.features
    sq = _segment_sum(x, feats * feats)
    positive = sq > 0
    g = torch.where(positive, sq, torch.ones_like(sq)).sqrt() * positive  # norm with a zero (not NaN) grad at 0
    n = (g / (g.mean(1, keepdim=True) + eps)).to(feats.dtype)  # sums in fp32, x * n in x's dtype (as timm)
    return x.replace_features(feats + torch.addcmul(bias, weight, feats * n[x.batch_index]))


# ---------------------------------------------------------------------------------------------------- regularisation
def drop_path(x: SparseMap, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True) -> SparseMap:
    """Per-sample stochastic depth; draws the same [B] Bernoulli numbers as timm's dense ``drop_path``."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    random_tensor = x.features.new_empty((x.batch_size, 1)).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        random_tensor.div_(keep_prob)
    return x.replace_features(x.features * random_tensor[x.batch_index])
