"""How a `SparseMap` takes part in torch's dispatch: model code written for dense tensors runs on it unchanged.

`SparseMap` is a plain Python object (not a ``torch.Tensor`` subclass) with a
``__torch_function__`` classmethod: every ``torch.*`` / ``F.*`` function and
every ``Tensor`` method called with a map among its arguments comes here
(methods through ``SparseMap.__getattr__`` and the operators). Why a wrapper
and not a subclass: a map's logical shape [B, C, H, W] is not the shape of any
tensor it holds ([N, C] features plus a bool mask), and a subclass would have
to lie about its storage to every aten kernel; the wrapper only has to answer
at the Python level, where the decision "per-site, reduction, spatial" is
made, and stays a zero-cost container inside the sparse layers.

Rules (``torch_function``):

* per-site ops (activations, arithmetic, comparisons, casts, dropout, ...)
  run on the features. A dense operand is brought to the rows: a scalar, a
  per-channel [C] / [1, C, 1, 1], a per-sample [B, C, 1, 1] (gathered by each
  row's sample) or a full [B, C, H, W] map (its active sites gathered);
  another map must have the same active sites;
* channel-structure ops act on the feature columns: ``cat`` / ``split`` /
  ``chunk`` along channels, ``x[:, a:b]``, ``view`` / ``reshape`` /
  ``flatten`` / ``transpose`` / ``permute`` of the channel axes (channel
  shuffles), and the NCHW <-> NHWC permutes (a flag: ``channels_last``);
* global reductions over H, W (``mean``, ``sum``, ``amax``, ``amin``,
  ``adaptive_avg_pool2d(1)``, ``adaptive_max_pool2d(1)``) return the dense
  [B, C(, 1, 1)] result of the zero-filled map (`kernels.spatial_reduce`);
  reductions over channels with ``keepdim`` stay sparse;
* ``conv2d`` (any groups), ``avg_pool2d``, ``max_pool2d``, ``batch_norm``
  (statistics over visible sites) and channels-last ``layer_norm`` / ``linear``
  use sparse kernels when their geometry keeps the patch grid;
* everything else (``interpolate``, ``pad``, ``group_norm``, other pools, ...)
  runs through the exact fallback: maps are densified (zeros at hidden sites),
  the dense op runs, and each 4-D output whose size lies on the patch grid is
  turned back into a map of its active sites. Gradients flow through both
  conversions. An output off the grid (e.g. after an asymmetric ``pad``)
  stays dense until the module running it returns, then it is converted back
  (`mark_dense`, `DenseCounter`). Each fallback is counted in `report`.

The dense-masked simulation classifies ops with the same tables
(`classify`), so a fallback's reference masks the same inputs and outputs.

Importing this module connects `SparseMap` to it (``tensor.connect``): the
map's torch calls come here, and `SparseMap.from_dense` tells `report` that a
forward pass starts. The tensor module and the report import nothing of the
engine; this module drives both.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import kernels, report, tensor
from .tensor import SparseMap, upsample_mask

__all__ = ["torch_function", "classify", "op_name", "first_map", "map_tree", "resparsify_output", "fallback", "mark_dense", "DenseCounter", "PER_SITE",
           "STRUCTURAL", "REDUCTIONS"]

# ---------------------------------------------------------------------------------------------------- op tables
_UNARY = """
relu relu_ relu6 hardtanh hardtanh_ gelu gelu_ silu silu_ sigmoid sigmoid_ tanh tanh_ hardswish hardswish_
hardsigmoid hardsigmoid_ leaky_relu leaky_relu_ elu elu_ selu selu_ celu celu_ mish mish_ softplus softsign
logsigmoid threshold threshold_ rrelu rrelu_ tanhshrink softshrink hardshrink prelu abs abs_ neg neg_ negative
exp exp_ log log_ log1p log1p_ sqrt sqrt_ rsqrt rsqrt_ square square_ reciprocal reciprocal_ clamp clamp_
clamp_min clamp_min_ clamp_max clamp_max_ clip clip_ sign erf erf_ floor ceil round trunc frac nan_to_num
dropout dropout_ alpha_dropout feature_alpha_dropout dropout1d dropout2d dropout3d sin cos
contiguous clone detach detach_ float double half bfloat16 to type type_as requires_grad_ cpu cuda
__neg__ __abs__ __invert__ logical_not isnan isfinite isinf bool int long
""".split()
_BINARY = """
add add_ sub sub_ rsub mul mul_ multiply div div_ divide true_divide true_divide_ floor_divide remainder fmod pow pow_
maximum minimum fmax fmin where addcmul addcmul_ addcdiv addcdiv_ lerp lerp_ eq ne lt le gt ge
__add__ __radd__ __iadd__ __sub__ __rsub__ __isub__ __mul__ __rmul__ __imul__ __truediv__ __rtruediv__
__itruediv__ __div__ __rdiv__ __pow__ __rpow__ __floordiv__ __rfloordiv__ __mod__ __eq__ __ne__ __lt__ __le__
__gt__ __ge__ __and__ __or__ __xor__ logical_and logical_or
""".split()
PER_SITE = frozenset(_UNARY + _BINARY)
# ops that only move channels / views around (the simulation needs no mask for them)
STRUCTURAL = frozenset("""
cat concat concatenate split split_with_sizes chunk tensor_split view reshape flatten transpose swapaxes permute
__getitem__ __setitem__ size dim ndimension numel shape ndim dtype device is_floating_point is_complex element_size
get_device is_contiguous stride data_ptr register_hook retain_grad backward item tolist __len__ __format__
__repr__ __bool__ __iter__ __reduce_ex__ __deepcopy__ new_zeros new_ones new_empty new_full new_tensor softmax
log_softmax glu normalize expand_as squeeze unsqueeze layer_norm rms_norm linear
""".split())
REDUCTIONS = frozenset("mean sum amax amin nansum adaptive_avg_pool2d adaptive_max_pool2d".split())
_META = frozenset("""
size dim ndimension numel is_floating_point is_complex element_size get_device is_contiguous register_hook
retain_grad item tolist __len__ __bool__ __format__ new_zeros new_ones new_empty new_full new_tensor
""".split())
_INPLACE_OUT_OF_PLACE = {"__iadd__": "__add__", "__isub__": "__sub__", "__imul__": "__mul__",
                         "__itruediv__": "__truediv__"}


def op_name(func) -> str:
    """The aten / torch function's name as the op tables list it."""
    return getattr(func, "__name__", None) or str(func)


def classify(func) -> str:
    """``"per_site"``, ``"structural"``, ``"reduction"``, ``"batch_norm"`` or ``"spatial"`` (anything else)."""
    name = op_name(func)
    if name in PER_SITE:
        return "per_site"
    if name in STRUCTURAL or name.startswith("__get") or name.startswith("_has_"):
        return "structural"
    if name in REDUCTIONS:
        return "reduction"
    if name == "batch_norm":
        return "batch_norm"
    return "spatial"


class _Unhandled(Exception):
    """The fast path does not apply: use the exact fallback."""


# ---------------------------------------------------------------------------------------------------- helpers
def first_map(obj) -> SparseMap | None:
    """The first ``SparseMap`` in an argument tree (lists, tuples, dicts), or None."""
    if isinstance(obj, SparseMap):
        return obj
    if isinstance(obj, (list, tuple)):
        for o in obj:
            m = first_map(o)
            if m is not None:
                return m
    elif isinstance(obj, dict):
        for o in obj.values():
            m = first_map(o)
            if m is not None:
                return m
    return None


def map_tree(obj, fn):
    """``fn`` applied to every tensor / map of an argument tree, the tree's shape kept (named tuples too)."""
    if isinstance(obj, SparseMap) or isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, list):
        return [map_tree(o, fn) for o in obj]
    if isinstance(obj, tuple):
        out = [map_tree(o, fn) for o in obj]
        return type(obj)(*out) if hasattr(obj, "_fields") else tuple(out)
    if isinstance(obj, dict):
        return {k: map_tree(v, fn) for k, v in obj.items()}
    return obj


def _cdims(m: SparseMap) -> int:
    return m.features.dim() - 1


def _norm_dim(d: int, ndim: int) -> int:
    d = int(d)
    if d < -ndim or d >= ndim:
        raise IndexError(f"dimension {d} out of range for a {ndim}-d sparse map")
    return d + ndim if d < 0 else d


def _feature_dim(m: SparseMap, d: int) -> int | None:
    """The feature-tensor dim of logical dim ``d`` if it is a channel dim, else None."""
    d = _norm_dim(d, m.ndim)
    if m.channels_last:
        return 1 if d == 3 else None
    return d if 1 <= d <= _cdims(m) else None


def _spatial_dims(m: SparseMap) -> tuple[int, int]:
    return (1, 2) if m.channels_last else (m.ndim - 2, m.ndim - 1)


def _wrap(m: SparseMap, out):
    """Rows of a per-site result back into a map on ``m``'s sites."""
    if isinstance(out, Tensor) and out.dim() >= 1 and out.shape[0] == m.num_sites and out.dim() >= 2:
        return m.replace_features(out)
    if isinstance(out, (tuple, list)) and not isinstance(out, Tensor):
        return type(out)(_wrap(m, o) for o in out) if not hasattr(out, "_fields") else out
    return out


def row_operand(m: SparseMap, t: Tensor) -> Tensor:
    """A dense operand of a per-site op, brought to broadcast against the map's [N, C...] rows."""
    if t.dim() == 0:
        return t
    feats = m.features
    D = _cdims(m)
    if t.dim() == 1 and D == 1:  # a 1-D [C] tensor is per-channel (as on a channels-last tensor)
        if t.shape[0] in (m.num_channels, 1):
            return t
        raise _Unhandled
    if t.dim() == 2 and D == 1 and t.shape[1] in (m.num_channels, 1):  # [B, C] / [1, C]: per sample / channel
        if t.shape[0] == 1:
            return t
        if t.shape[0] == m.batch_size:
            return t[m.batch_index]
        raise _Unhandled
    if t.dim() == 4 and D == 1 and not m.channels_last and t.shape[:3] == (1, 1, 1) \
            and t.shape[3] == m.num_channels and m.spatial_shape[1] != m.num_channels:
        return t.reshape(1, -1)  # [1, 1, 1, C]: a channels-last per-channel tensor
    nd = m.ndim
    if t.dim() > nd:
        raise _Unhandled
    shape = (1,) * (nd - t.dim()) + tuple(t.shape)
    t = t.reshape(shape)
    if m.channels_last:
        t = t.permute(0, 3, 1, 2)
        shape = tuple(t.shape)
    b, cd, hw = shape[0], shape[1:1 + D], shape[1 + D:]
    if b not in (1, m.batch_size) or any(c not in (1, f) for c, f in zip(cd, feats.shape[1:])):
        raise _Unhandled
    if hw == (1, 1):
        t = t.reshape((b,) + tuple(cd))
        return t if b == 1 else t[m.batch_index]
    if hw == m.spatial_shape:
        t = t.expand((m.batch_size,) + tuple(cd) + hw).movedim(1, -1) if D == 1 else \
            t.expand((m.batch_size,) + tuple(cd) + hw).permute(0, D + 1, D + 2, *range(1, D + 1))
        return m.gather_sites(t)
    raise _Unhandled


def _to_rows(m: SparseMap, obj):
    def fn(o):
        if isinstance(o, SparseMap):
            if o is not m and not (o.features.dim() == m.features.dim() and m.same_sites(o)):
                m._check_partner(o, "combine")
                raise _Unhandled
            if o.channels_last != m.channels_last and _cdims(o) == 1 and o.num_channels != 1:
                raise _Unhandled
            return o.features
        return row_operand(m, o)
    return map_tree(obj, fn)


# ---------------------------------------------------------------------------------------------------- dense <-> sparse
def to_dense(m: SparseMap) -> Tensor:
    """The map's logical dense tensor (zeros at hidden sites), in its logical layout."""
    if _cdims(m) == 1:
        d = m.dense()
        return d.permute(0, 2, 3, 1) if m.channels_last else d
    cshape = tuple(m.features.shape[1:])
    flat = m.replace_features(m.features.reshape(m.num_sites, -1))
    flat.channels_last = False
    d = flat.dense()
    return d.reshape((m.batch_size,) + cshape + m.spatial_shape)


def _patch_grid(ref: SparseMap) -> Tensor | None:
    scales = ref.cache.get("scales")
    if scales is not None:
        return scales.visible
    f = ref.patch_factor
    return ref.mask[:, ::f, ::f] if f > 1 else None


def map_at(ref: SparseMap, h: int, w: int) -> tuple[Tensor, dict] | None:
    """(mask, cache) of the active sites at an h x w scale of ``ref``'s image, or None if off the grid."""
    if (h, w) == ref.spatial_shape:
        return ref.mask, ref.cache
    scales = ref.cache.get("scales")
    if scales is not None:
        return scales.at(h, w)
    grid = _patch_grid(ref)
    if grid is None:
        return None
    gh, gw = grid.shape[1:]
    if h % gh or w % gw or h // gh != w // gw:
        return None
    f = h // gh
    return upsample_mask(grid, f), {"patch_factor": f}


def _sparsify_dense(t: Tensor, ref: SparseMap) -> SparseMap | None:
    if not isinstance(t, Tensor) or t.dim() != 4 or t.shape[0] != ref.batch_size or not t.is_floating_point():
        return None
    entry = map_at(ref, int(t.shape[2]), int(t.shape[3]))
    if entry is None:
        return None
    mask, cache = entry
    return SparseMap.from_sites(t, mask, cache)


def resparsify_output(output, ref: SparseMap):
    """Turn the dense 4-D on-grid tensors of a module's output back into maps; (new output, all converted)."""
    complete = [True]

    def fn(o):
        if isinstance(o, Tensor) and o.dim() >= 3:
            s = _sparsify_dense(o, ref)
            if s is None:
                complete[0] = False
                return o
            return s
        return o
    if isinstance(output, SparseMap):
        return output, True
    out = map_tree(output, fn)
    return out, complete[0]


def fallback(func, args, kwargs, ref: SparseMap, reason: str = ""):
    """Exact fallback: densify the maps, run the dense op, sparsify the on-grid 4-D outputs."""
    name = op_name(func)
    dargs = map_tree(args, lambda o: to_dense(o) if isinstance(o, SparseMap) else o)
    dkwargs = map_tree(kwargs, lambda o: to_dense(o) if isinstance(o, SparseMap) else o)
    out = func(*dargs, **dkwargs)
    try:
        macs = report.dense_macs(name, dargs, out)
    except Exception:
        macs = 0
    report.record(name, macs, "fallback")
    complete = [True]

    def fn(o):
        if isinstance(o, Tensor) and o.dim() == 4 and o.shape[0] == ref.batch_size:
            s = _sparsify_dense(o, ref)
            if s is not None:
                return s
            complete[0] = False
        return o
    result = map_tree(out, fn)
    if not complete[0]:
        mark_dense(ref)
    if name.endswith("_") and not name.endswith("__") and isinstance(args[0], SparseMap) \
            and isinstance(result, SparseMap) and args[0].same_sites(result):
        args[0].features = result.features  # an in-place op: update the map object itself
        return args[0]
    return result


# ---------------------------------------------------------------------------------------------------- off the grid
def mark_dense(ref: SparseMap) -> None:
    """An op of the current module produced a dense tensor off the patch grid (sparse map ``ref`` went in).

    Until the module returns, dense conv / linear MACs count as fallback MACs
    (`DenseCounter`), and its dense 4-D outputs on the grid are turned back into
    sparse maps; what is still off the grid then passes to the enclosing module.
    """
    frame = report.current_scope()
    if frame is None or frame.dense_ref is not None:
        return
    frame.dense_ref = ref
    frame.counter = DenseCounter(ref)
    frame.counter.__enter__()

    def on_exit(output):  # called by report when the module returns (its frame is off the scope stack then)
        result, complete = resparsify_output(output, ref)
        if not complete:  # still a dense off-grid tensor: the enclosing module takes over
            mark_dense(ref)
        return result
    frame.on_exit = on_exit


_MAC_OPS = {"conv1d", "conv2d", "conv3d", "conv_transpose2d", "linear", "matmul", "mm", "bmm", "addmm", "einsum",
            "__matmul__"}


class DenseCounter(torch.overrides.TorchFunctionMode):
    """Active while a module holds a dense tensor off the patch grid (after e.g. an asymmetric ``pad``).

    Counts the MACs of conv / linear / matmul ops on dense tensors as fallback
    MACs of the module, and brings the data back to the sparse side as soon as
    it can: a spatial op, reduction or ``batch_norm`` whose input is a dense 4-D
    tensor on the patch grid gets that input as a sparse map (its active sites,
    as the dense-masked simulation masks it), and a spatial op's dense 4-D
    outputs on the grid become maps.
    """

    def __init__(self, ref: SparseMap):
        super().__init__()
        self.ref = ref

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = classify(func)
        if kind in ("spatial", "reduction", "batch_norm") and args and isinstance(args[0], Tensor) \
                and first_map(args) is None and first_map(kwargs) is None:
            s = _sparsify_dense(args[0], self.ref)
            if s is not None:
                return func(s, *args[1:], **kwargs)
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in _MAC_OPS:
            try:
                report.record(name, report.dense_macs(name, args, out), "fallback")
            except Exception:  # counting must never break the model
                pass
        if kind == "spatial" and first_map(args) is None:
            out, _ = resparsify_output(out, self.ref)
        return out


# ---------------------------------------------------------------------------------------------------- handlers
def _arg(args, kwargs, i: int, name: str, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _per_site(func, args, kwargs, m):
    name = op_name(func)
    if name in _INPLACE_OUT_OF_PLACE:  # `x += y` rebinds the name: keep autograd simple, out of place
        func = getattr(Tensor, _INPLACE_OUT_OF_PLACE[name])
    rargs, rkwargs = _to_rows(m, args), _to_rows(m, kwargs)
    out = func(*rargs, **rkwargs)
    if out is m.features:
        return m if isinstance(args[0], SparseMap) and args[0] is m else m.replace_features(out)
    return _wrap(m, out)


def _reduce(func, args, kwargs, m):
    name = op_name(func)
    x = args[0]
    if not isinstance(x, SparseMap):
        raise _Unhandled
    if name in ("adaptive_avg_pool2d", "adaptive_max_pool2d"):
        size = _arg(args, kwargs, 1, "output_size")
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        if size != (1, 1) or x.channels_last or _arg(args, kwargs, 2, "return_indices", False):
            raise _Unhandled
        out = kernels.spatial_reduce(x, "mean" if name == "adaptive_avg_pool2d" else "amax")
        return out[..., None, None]
    dim = _arg(args, kwargs, 1, "dim")
    keepdim = bool(_arg(args, kwargs, 2, "keepdim", False))
    dtype = kwargs.get("dtype")
    if dim is None or (isinstance(dim, (tuple, list)) and len(dim) == 0):
        raise _Unhandled
    dims = {_norm_dim(d, x.ndim) for d in (dim if isinstance(dim, (tuple, list)) else (dim,))}
    op = "sum" if name == "nansum" else name
    if dims == set(_spatial_dims(x)):
        out = kernels.spatial_reduce(x, op)
        if dtype is not None:
            out = out.to(dtype)
        if keepdim:
            out = out[:, None, None] if x.channels_last else out[..., None, None]
        return out
    fdims = [_feature_dim(x, d) for d in dims]
    if keepdim and all(f is not None for f in fdims):
        out = getattr(torch, op)(x.features, dim=tuple(fdims), keepdim=True)
        return x.replace_features(out if dtype is None else out.to(dtype))
    raise _Unhandled


def _conv2d(func, args, kwargs, m):
    x, weight = args[0], _arg(args, kwargs, 1, "weight")
    if not isinstance(x, SparseMap) or isinstance(weight, SparseMap) or x.channels_last or _cdims(x) != 1:
        raise _Unhandled
    bias = _arg(args, kwargs, 2, "bias")
    stride, padding = _arg(args, kwargs, 3, "stride", 1), _arg(args, kwargs, 4, "padding", 0)
    dilation, groups = _arg(args, kwargs, 5, "dilation", 1), _arg(args, kwargs, 6, "groups", 1)
    try:
        return kernels.conv2d(x, weight, bias, stride, padding, dilation, groups)
    except ValueError:  # geometry off the patch grid ('valid', asymmetric, ...)
        raise _Unhandled


def _avg_pool2d(func, args, kwargs, m):
    x = args[0]
    if not isinstance(x, SparseMap) or x.channels_last or _cdims(x) != 1:
        raise _Unhandled
    names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
    defaults = (None, None, 0, False, True, None)
    vals = [_arg(args, kwargs, i + 1, n, d) for i, (n, d) in enumerate(zip(names, defaults))]
    try:
        return kernels.avg_pool2d(x, *vals)
    except ValueError:
        raise _Unhandled


def _max_pool2d(func, args, kwargs, m):
    x = args[0]
    if not isinstance(x, SparseMap) or x.channels_last or _cdims(x) != 1:
        raise _Unhandled
    names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    defaults = (None, None, 0, 1, False, False)
    k, s, p, d, ceil, ret = [_arg(args, kwargs, i + 1, n, dv) for i, (n, dv) in enumerate(zip(names, defaults))]
    if ret or op_name(func) == "max_pool2d_with_indices":
        raise _Unhandled
    try:
        return kernels.max_pool2d(x, k, s, p, d, ceil)
    except ValueError:
        raise _Unhandled


def _batch_norm(func, args, kwargs, m):
    x = args[0]
    if not isinstance(x, SparseMap) or x.channels_last or _cdims(x) != 1:
        raise _Unhandled
    rest = map_tree(args[1:], lambda o: o)
    if any(isinstance(o, SparseMap) for o in rest) or any(isinstance(v, SparseMap) for v in kwargs.values()):
        raise _Unhandled
    return x.replace_features(func(x.features, *rest, **kwargs))


def _layer_norm(func, args, kwargs, m):
    x = args[0]
    shape = _arg(args, kwargs, 1, "normalized_shape")
    shape = tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else (shape,)
    if not isinstance(x, SparseMap) or not x.channels_last or shape != (x.num_channels,):
        raise _Unhandled
    return x.replace_features(func(x.features, *args[1:], **kwargs))


def _linear(func, args, kwargs, m):
    x = args[0]
    if not isinstance(x, SparseMap) or not x.channels_last or isinstance(_arg(args, kwargs, 1, "weight"), SparseMap):
        raise _Unhandled
    out = func(x.features, *args[1:], **kwargs)
    report.record("linear", out.numel() * x.num_channels, "sparse")
    return x.replace_features(out)


def _cat(func, args, kwargs, m):
    tensors = args[0] if args else kwargs.get("tensors")
    if isinstance(tensors, SparseMap):  # torch.cat(map, 1): a one-map list (DenseNet passes its input so)
        tensors = [tensors]
    dim = _arg(args, kwargs, 1, "dim", 0)
    fdim = _feature_dim(m, dim)
    if fdim is None:
        raise _Unhandled
    rows = []
    for t in tensors:
        if isinstance(t, SparseMap):
            if t.channels_last != m.channels_last or _cdims(t) != _cdims(m):
                raise _Unhandled
            if t is not m and not m.same_sites(t):
                m._check_partner(t, "concatenate")
            rows.append(t.features)
        else:
            op = row_operand(m, t)
            if op.shape[0] != m.num_sites:
                raise _Unhandled
            rows.append(op)
    return m.replace_features(torch.cat(rows, fdim))


def _split(func, args, kwargs, m):
    x = args[0]
    if not isinstance(x, SparseMap):
        raise _Unhandled
    name = op_name(func)
    size = _arg(args, kwargs, 1, "chunks" if name == "chunk" else "split_size_or_sections")
    if size is None:
        size = kwargs.get("split_size", kwargs.get("split_sizes", kwargs.get("sections")))
    dim = _arg(args, kwargs, 2, "dim", 0)
    fdim = _feature_dim(x, dim)
    if fdim is None:
        raise _Unhandled
    parts = getattr(torch, "chunk" if name == "chunk" else ("tensor_split" if name == "tensor_split" else "split"))(
        x.features, size, fdim)
    return tuple(x.replace_features(p) for p in parts)


def _getitem(func, args, kwargs, m):
    x, idx = args[0], args[1]
    if not isinstance(x, SparseMap) or x.channels_last or _cdims(x) != 1:
        raise _Unhandled
    idx = idx if isinstance(idx, tuple) else (idx,)
    if idx and idx[-1] is Ellipsis:
        idx = idx[:-1]
    full = slice(None)
    if len(idx) >= 2 and idx[0] == full and isinstance(idx[1], slice) and all(i == full for i in idx[2:4]) \
            and len(idx) <= 4:
        return x.replace_features(x.features[:, idx[1]])
    if len(idx) == 1 and idx[0] == full:
        return x
    raise _Unhandled


def _setitem(func, args, kwargs, m):
    x, idx, value = args[0], args[1], args[2]
    idx = idx if isinstance(idx, tuple) else (idx,)
    full = slice(None)
    if isinstance(x, SparseMap) and not x.channels_last and _cdims(x) == 1 and len(idx) >= 2 and idx[0] == full \
            and isinstance(idx[1], slice) and all(i == full for i in idx[2:4]) and len(idx) <= 4:
        val = value.features if isinstance(value, SparseMap) else (
            row_operand(x, value) if isinstance(value, Tensor) else value)
        feats = x.features.clone()
        feats[:, idx[1]] = val
        x.features = feats
        return None
    raise NotImplementedError(f"in-place assignment x[{idx}] = ... into a sparse map is only supported along the "
                              "channel axis (x[:, a:b] = y); write the block out of place, e.g. with torch.cat")


def _shape_args(args, kwargs):
    shape = args[1:] if len(args) > 1 else (kwargs.get("shape") or kwargs.get("size") or ())
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    return tuple(int(s) for s in shape)


def _view(func, args, kwargs, m):
    x = args[0]
    if not isinstance(x, SparseMap) or x.channels_last:
        raise _Unhandled
    if op_name(func) == "reshape" and len(args) == 2 and isinstance(args[1], (tuple, list, torch.Size)):
        shape = tuple(args[1])
    else:
        shape = _shape_args(args, kwargs)
    h, w = x.spatial_shape
    if len(shape) < 3 or tuple(shape[-2:]) != (h, w) or shape[0] not in (x.batch_size, -1):
        raise _Unhandled
    cd = list(shape[1:-2])
    if not cd:
        raise _Unhandled
    if shape[0] == -1 and -1 in cd:
        raise _Unhandled
    feats = x.features.reshape((x.num_sites,) + tuple(cd))
    return x.replace_features(feats)


def _flatten(func, args, kwargs, m):
    x = args[0]
    start, end = _arg(args, kwargs, 1, "start_dim", 0), _arg(args, kwargs, 2, "end_dim", -1)
    if not isinstance(x, SparseMap) or x.channels_last:
        raise _Unhandled
    s, e = _norm_dim(start, x.ndim), _norm_dim(end, x.ndim)
    if s == e:
        return x
    if 1 <= s and e <= _cdims(x):
        return x.replace_features(x.features.flatten(s, e))
    raise _Unhandled


def _transpose(func, args, kwargs, m):
    x = args[0]
    d0, d1 = _arg(args, kwargs, 1, "dim0"), _arg(args, kwargs, 2, "dim1")
    if not isinstance(x, SparseMap) or x.channels_last:
        raise _Unhandled
    f0, f1 = _feature_dim(x, d0), _feature_dim(x, d1)
    if f0 is None or f1 is None:
        raise _Unhandled
    return x.replace_features(x.features.transpose(f0, f1))


def _permute(func, args, kwargs, m):
    x = args[0]
    dims = args[1:] if len(args) > 1 else tuple(kwargs.get("dims", ()))
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    dims = tuple(_norm_dim(d, x.ndim) for d in dims)
    if dims == tuple(range(x.ndim)):
        return x
    if _cdims(x) == 1:
        if (not x.channels_last and dims == (0, 2, 3, 1)) or (x.channels_last and dims == (0, 3, 1, 2)):
            out = SparseMap(x.features, x.mask, x.cache, channels_last=not x.channels_last)
            return out
        raise _Unhandled
    D = _cdims(x)
    if dims[0] == 0 and dims[-2:] == (D + 1, D + 2) and sorted(dims[1:-2]) == list(range(1, D + 1)):
        return x.replace_features(x.features.permute(0, *dims[1:-2]))
    raise _Unhandled


def _dim_per_site(func, args, kwargs, m):
    """softmax / log_softmax / glu / normalize along a channel dim."""
    x = args[0]
    if not isinstance(x, SparseMap):
        raise _Unhandled
    name = op_name(func)
    default = {"glu": -1, "normalize": 1}.get(name)
    pos = 2 if name == "normalize" else 1
    dim = _arg(args, kwargs, pos, "dim", default)
    if dim is None:
        raise _Unhandled
    fdim = _feature_dim(x, dim)
    if fdim is None:
        raise _Unhandled
    new_args = list(args)
    new_args[0] = x.features
    if len(args) > pos:
        new_args[pos] = fdim
    else:
        kwargs = dict(kwargs, dim=fdim)
    return x.replace_features(func(*new_args, **kwargs))


_HANDLERS = {
    "conv2d": _conv2d, "avg_pool2d": _avg_pool2d, "max_pool2d": _max_pool2d, "_max_pool2d": _max_pool2d,
    "max_pool2d_with_indices": _max_pool2d, "batch_norm": _batch_norm, "layer_norm": _layer_norm,
    "linear": _linear, "cat": _cat, "concat": _cat, "concatenate": _cat, "split": _split,
    "split_with_sizes": _split, "chunk": _split, "tensor_split": _split, "__getitem__": _getitem,
    "__setitem__": _setitem, "view": _view, "reshape": _view, "flatten": _flatten, "transpose": _transpose,
    "swapaxes": _transpose, "permute": _permute, "softmax": _dim_per_site, "log_softmax": _dim_per_site,
    "glu": _dim_per_site, "normalize": _dim_per_site,
}
for _r in REDUCTIONS:
    _HANDLERS[_r] = _reduce


def torch_function(func, args: tuple, kwargs: dict | None) -> Any:
    """`SparseMap.__torch_function__`: the rules of the module docstring."""
    kwargs = kwargs or {}
    m = first_map(args) or first_map(kwargs)
    if m is None:
        return func(*args, **kwargs)
    name = op_name(func)
    if name in _META:
        x = args[0]
        if isinstance(x, SparseMap):
            if name in ("size", "dim", "ndimension", "numel", "__len__"):
                return getattr(x, "__len__" if name == "__len__" else name)(*args[1:], **kwargs)
            return func(x.features, *args[1:], **kwargs)
    handler = _HANDLERS.get(name)
    try:
        if handler is not None:
            return handler(func, args, kwargs, m)
        if name in PER_SITE:
            return _per_site(func, args, kwargs, m)
    except _Unhandled:
        pass
    if name in PER_SITE:
        try:
            return fallback(func, args, kwargs, m)
        except RuntimeError as e:
            shapes = [tuple(a.shape) for a in args if isinstance(a, (Tensor, SparseMap))]
            raise ValueError(
                f"{name}: cannot combine a sparse map (logical shape {tuple(m.shape)}) with operands of shapes "
                f"{shapes}: a dense operand must broadcast against the map, e.g. a scalar, a per-channel [C] / "
                "[1, C, 1, 1], a per-sample [B, C] / [B, C, 1, 1] tensor, a full [B, C, H, W] map, or another "
                "sparse map on the same sites") from e
    return fallback(func, args, kwargs, m)


tensor.connect(torch_function, report.new_pass)
