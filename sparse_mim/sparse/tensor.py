"""`SparseMap`: the visible sites of a masked NCHW batch as a real sparse tensor.

SparK hides most 32x32 patches of an image. At a feature scale of stride s the
active set is the patch mask upsampled by 32/s (nearest). A `SparseMap` keeps
only the features at those active sites:

* ``features``  [N, C]  one row per visible site,
* ``mask``      [B, h, w] bool, the active set at this scale,
* ``indices``   [N, 3] contiguous int32 (batch, y, x), derived from ``mask``.

Rows are always in *canonical order*: sorted by (batch, y, x), i.e. the order
of ``mask.nonzero()``. Every op that changes scale re-establishes that order,
so two maps with equal masks have row-aligned features and can be added.

Maps that share their sites also share ``cache``: a dict where ops keep index
tables (neighbour tables, spconv index pairs) built once per scale and reused
by every layer at that scale. A map made by `SparseMap.from_dense` also keeps
the image's patch grid (``cache["scales"]``), so that every scale of that
image (strided ops, and dense results turned back into maps) has one mask
object and one cache.

A map behaves like the dense [B, C, h, w] tensor it stands for (zeros at
hidden sites) when model code calls torch on it: ``SparseMap.__torch_function__``
and the tensor methods route every call to `dispatch`, which runs per-site
ops on the features, reductions over H, W exactly, spatial ops with a sparse
kernel on it, and anything else through an exact dense fallback.

This module is the bottom of the engine and imports none of it: `dispatch`
plugs the torch-function handler and the report's "a forward pass starts"
signal in when the engine is imported (`connect`).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["SparseMap", "upsample_mask", "check_visible_mask", "Scales", "connect"]


def _not_connected(*args, **kwargs):
    raise RuntimeError("a SparseMap was used by torch before the sparse engine's dispatch was connected; "
                       "import sparse_mim.sparse (not only sparse_mim.sparse.tensor) before running model code on maps")


# Set by `dispatch` when it is imported (`connect`): the engine above this module, called without importing it.
_HOOKS: dict[str, Callable[..., Any]] = {"torch_function": _not_connected, "new_pass": lambda: None}


def connect(torch_function: Callable[[Any, tuple, dict | None], Any], new_pass: Callable[[], None]) -> None:
    """Plug the engine into the map: ``torch_function(func, args, kwargs)`` runs every torch call on a map
    (`dispatch.torch_function`); ``new_pass()`` is called when `SparseMap.from_dense` starts a forward pass
    (`report.new_pass`). Called once by `dispatch` at import."""
    _HOOKS["torch_function"] = torch_function
    _HOOKS["new_pass"] = new_pass


def upsample_mask(visible: Tensor, factor: int) -> Tensor:
    """Nearest upsampling of a bool [B, h, w] mask by an integer factor."""
    if factor == 1:
        return visible
    return visible.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)


def check_visible_mask(visible: Tensor, height: int, width: int, batch_size: int | None = None,
                       device: torch.device | None = None) -> int:
    """Validate a patch-level visible mask for an input of ``height`` x ``width``.

    Returns the upsampling factor (pixels per mask cell). Raises ``ValueError``
    with a message that says what is wrong and how to fix it.
    """
    if not isinstance(visible, Tensor):
        raise TypeError(f"visible mask must be a torch.Tensor, got {type(visible).__name__}")
    if visible.dtype != torch.bool:
        raise ValueError(f"visible mask must be a bool tensor (True = visible), got dtype {visible.dtype}; "
                         "convert with `mask.bool()`")
    if visible.dim() != 3:
        raise ValueError(f"visible mask must be [B, h, w], got shape {tuple(visible.shape)}")
    if batch_size is not None and visible.shape[0] != batch_size:
        raise ValueError(f"visible mask has batch {visible.shape[0]} but the feature map has batch {batch_size}")
    if device is not None and visible.device != device:
        raise ValueError(f"visible mask is on {visible.device} but the features are on {device}; "
                         "move both to the same device")
    h, w = visible.shape[1:]
    if h == 0 or w == 0 or height % h or width % w or height // h != width // w:
        raise ValueError(
            f"visible mask of grid {h}x{w} does not fit a {height}x{width} map: each side of the map must be "
            f"the same integer multiple of the mask's side (e.g. a {height // 32}x{width // 32} patch mask for a "
            f"{height}x{width} image with 32-pixel patches)")
    empty = (~visible.flatten(1).any(1)).nonzero().flatten()
    if empty.numel():
        raise ValueError(f"images {empty.tolist()} of the batch have no visible patch; every image needs at "
                         "least one (lower mask_ratio, or check how the mask was built)")
    return height // h


class Scales:
    """The patch grid of one image batch and the (mask, cache) of every scale met so far."""

    def __init__(self, visible: Tensor):
        self.visible = visible
        self.by_size: dict[tuple[int, int], tuple[Tensor, dict]] = {}

    def at(self, height: int, width: int) -> tuple[Tensor, dict] | None:
        """(mask, cache) at an ``height`` x ``width`` scale; None when that size is off the patch grid."""
        entry = self.by_size.get((height, width))
        if entry is None:
            gh, gw = self.visible.shape[1:]
            if height % gh or width % gw or height // gh != width // gw or height == 0:
                return None
            factor = height // gh
            entry = (upsample_mask(self.visible, factor), {"patch_factor": factor, "scales": self})
            self.by_size[(height, width)] = entry
        return entry

    def register(self, mask: Tensor, cache: dict) -> tuple[Tensor, dict]:
        """Make (mask, cache) the entry of its scale unless one exists; returns the entry to use."""
        key = (int(mask.shape[1]), int(mask.shape[2]))
        entry = self.by_size.get(key)
        if entry is None:
            cache["scales"] = self
            entry = self.by_size[key] = (mask, cache)
        return entry


class SparseMap:
    """Features at the visible sites of a [B, C, h, w] map, in canonical (batch, y, x) row order.

    ``channels_last``: the map stands for the NHWC permute of that tensor (set
    by ``x.permute(0, 2, 3, 1)``; the features do not move).
    """

    __slots__ = ("features", "mask", "cache", "channels_last")

    def __init__(self, features: Tensor, mask: Tensor, cache: dict[str, Any] | None = None,
                 channels_last: bool = False):
        self.features = features
        self.mask = mask
        self.cache = {} if cache is None else cache
        self.channels_last = channels_last

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dense(cls, x: Tensor, visible: Tensor, patch_size: int | None = None) -> "SparseMap":
        """Gather the visible sites of dense ``x`` [B, C, H, W].

        ``visible`` is a bool mask [B, h, w] at ``x``'s resolution or coarser
        (e.g. the 32-pixel patch mask of an image); it is upsampled to H x W.
        With ``patch_size`` (e.g. 32 for an image entering a backbone), H and W
        must be multiples of it and ``visible`` must be the H/p x W/p patch grid.
        """
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"expected a dense NCHW tensor, got {getattr(x, 'shape', type(x).__name__)}")
        B, _, H, W = x.shape
        if patch_size is not None:
            if H % patch_size or W % patch_size:
                raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {patch_size}; resize or "
                                 f"crop to e.g. {max(H // patch_size, 1) * patch_size}x"
                                 f"{max(W // patch_size, 1) * patch_size}")
            if isinstance(visible, Tensor) and tuple(visible.shape[1:]) != (H // patch_size, W // patch_size):
                raise ValueError(f"visible mask grid {tuple(visible.shape[1:])} does not fit a {H}x{W} image "
                                 f"with {patch_size}-pixel patches: expected {(H // patch_size, W // patch_size)}")
        factor = check_visible_mask(visible, H, W, batch_size=B, device=x.device)
        _HOOKS["new_pass"]()  # report: the last pass's new fallbacks are logged
        mask = upsample_mask(visible, factor)
        # patch_factor: the mask is constant on aligned patch_factor^2 blocks (lets convs work per patch window)
        mask, cache = Scales(visible).register(mask, {"patch_factor": factor})
        return cls.from_sites(x, mask, cache)

    @classmethod
    def from_sites(cls, x: Tensor, mask: Tensor, cache: dict[str, Any] | None = None) -> "SparseMap":
        """The map of dense ``x`` [B, C, h, w] at the active sites of ``mask`` (sharing ``cache``, its scale's)."""
        out = cls(x.new_empty((0, x.shape[1])), mask, cache)
        out.features = out.gather_sites(x.permute(0, 2, 3, 1))
        return out

    def replace_features(self, features: Tensor) -> "SparseMap":
        """A map at the same sites (sharing the index cache) with new features."""
        if features.shape[0] != self.features.shape[0]:
            raise ValueError(f"new features have {features.shape[0]} rows, the map has {self.features.shape[0]} sites")
        return SparseMap(features, self.mask, self.cache, self.channels_last)

    # ------------------------------------------------------------------ geometry
    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @property
    def spatial_shape(self) -> tuple[int, int]:
        return int(self.mask.shape[1]), int(self.mask.shape[2])

    @property
    def num_channels(self) -> int:
        return self.features.shape[1]

    @property
    def shape(self) -> torch.Size:
        """The logical dense shape: [B, C, h, w] ([B, h, w, C] when ``channels_last``)."""
        B, (h, w) = self.batch_size, self.spatial_shape
        if self.channels_last:
            return torch.Size((B, h, w) + tuple(self.features.shape[1:]))
        return torch.Size((B,) + tuple(self.features.shape[1:]) + (h, w))

    @property
    def ndim(self) -> int:
        return self.features.dim() + 2

    def dim(self) -> int:
        return self.ndim

    ndimension = dim

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return self.shape.numel()

    def __len__(self) -> int:
        return self.batch_size

    @property
    def requires_grad(self) -> bool:
        return self.features.requires_grad

    @property
    def is_cuda(self) -> bool:
        return self.features.is_cuda

    @property
    def grad_fn(self):
        return self.features.grad_fn

    @property
    def num_sites(self) -> int:
        return self.features.shape[0]

    @property
    def patch_factor(self) -> int:
        """Side of the aligned blocks (mask patches at this scale) on which the mask is constant; 1 if unknown."""
        return int(self.cache.get("patch_factor", 1))

    @property
    def device(self) -> torch.device:
        return self.features.device

    @property
    def dtype(self) -> torch.dtype:
        return self.features.dtype

    @property
    def indices(self) -> Tensor:
        """[N, 3] contiguous int32 (batch, y, x): the layout spconv reads (docs/sparse_engine.md, spconv pitfall 2)."""
        idx = self.cache.get("indices")
        if idx is None:
            idx = self.mask.nonzero().int().contiguous()
            self.cache["indices"] = idx
        return idx

    @property
    def flat_index(self) -> Tensor:
        """[N] int64 position of every row in the flattened [B * h * w] grid (cached per scale).

        Scatter and gather through it instead of through the bool mask: indexing by a mask runs a
        ``nonzero`` every time, and on CUDA each one stalls the host until the GPU catches up. This index
        is built once per scale (from `indices`, the one ``nonzero`` of the scale) and reused by every layer.
        """
        flat = self.cache.get("flat_index")
        if flat is None:
            h, w = self.spatial_shape
            idx = self.indices.long()
            flat = (idx[:, 0] * h + idx[:, 1]) * w + idx[:, 2]
            self.cache["flat_index"] = flat
        return flat

    def gather_sites(self, dense_nhwc: Tensor) -> Tensor:
        """Rows of a dense [B, h, w, *C] tensor at this map's sites, canonical order (differentiable; no sync)."""
        rows = dense_nhwc.reshape((-1,) + tuple(dense_nhwc.shape[3:]))
        return rows.index_select(0, self.flat_index)

    @property
    def batch_index(self) -> Tensor:
        """[N] int64 batch index of every row."""
        b = self.cache.get("batch_index")
        if b is None:
            b = self.indices[:, 0].long()
            self.cache["batch_index"] = b
        return b

    @property
    def sites_per_sample(self) -> Tensor:
        """[B] int64 number of visible sites of each sample."""
        n = self.cache.get("sites_per_sample")
        if n is None:
            n = self.mask.flatten(1).sum(1)
            self.cache["sites_per_sample"] = n
        return n

    def same_sites(self, other: "SparseMap") -> bool:
        if self.cache is other.cache or self.mask is other.mask:
            return True
        return self.mask.shape == other.mask.shape and bool(torch.equal(self.mask, other.mask))

    # ------------------------------------------------------------------ conversion
    def dense(self, fill: float = 0.0) -> Tensor:
        """Scatter back to a dense [B, C, h, w] tensor with ``fill`` at hidden sites (differentiable)."""
        B, (h, w), C = self.batch_size, self.spatial_shape, self.num_channels
        out = self.features.new_full((B * h * w, C), fill)
        out = out.index_put((self.flat_index,), self.features)  # an index built once per scale: no sync
        return out.view(B, h, w, C).permute(0, 3, 1, 2)

    def to(self, *args, **kwargs) -> "SparseMap":
        features = self.features.to(*args, **kwargs)
        if features.device == self.features.device:
            return SparseMap(features, self.mask, self.cache, self.channels_last)
        return SparseMap(features, self.mask.to(features.device), None, self.channels_last)

    # ------------------------------------------------------------------ arithmetic
    def _check_partner(self, other: "SparseMap", op: str) -> None:
        if not self.same_sites(other):
            raise ValueError(
                f"cannot {op} two sparse maps whose active sites differ (shapes {tuple(self.mask.shape)} and "
                f"{tuple(other.mask.shape)}, {self.num_sites} vs {other.num_sites} sites). A residual branch must "
                "keep the sites of its input: restrict strided outputs to the coarse mask before adding.")

    # ------------------------------------------------------------------ torch dispatch
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _HOOKS["torch_function"](func, args, kwargs)

    def __getattr__(self, name: str):
        """Tensor methods (``x.mean``, ``x.sigmoid``, ``x.split``, ...) go through torch dispatch."""
        if name.startswith("__") or name in SparseMap.__slots__:
            raise AttributeError(name)
        attr = getattr(Tensor, name, None)
        if attr is None or not callable(attr):
            raise AttributeError(f"'SparseMap' object has no attribute {name!r}")

        def method(*args, **kwargs):
            return _HOOKS["torch_function"](attr, (self,) + args, kwargs)
        method.__name__ = name
        return method

    def add(self, other, alpha=1) -> "SparseMap":
        return self._op(Tensor.add, other, alpha=alpha)

    def mul(self, other) -> "SparseMap":
        return self._op(Tensor.mul, other)

    def permute(self, *dims) -> "SparseMap":
        """``permute(0, 2, 3, 1)`` / ``(0, 3, 1, 2)``: NCHW <-> NHWC, a flag (the features are [N, C] either way).

        Lets dense blocks that switch to channels-last around a LayerNorm / MLP
        (timm's ConvNeXtBlock) run unchanged on a sparse map. Other permutes go
        through torch dispatch (channel-axis permutes stay sparse).
        """
        return self._op(Tensor.permute, *dims)

    def _op(self, func, *args, **kwargs):
        return _HOOKS["torch_function"](func, (self,) + args, kwargs)

    def __add__(self, other):
        return self._op(Tensor.__add__, other)

    def __radd__(self, other):
        return self._op(Tensor.__add__, other)

    def __iadd__(self, other):  # torchvision blocks write `out += identity`; keep it out-of-place for autograd
        return self._op(Tensor.__add__, other)

    def __sub__(self, other):
        return self._op(Tensor.__sub__, other)

    def __rsub__(self, other):
        return self._op(Tensor.__rsub__, other)

    def __isub__(self, other):
        return self._op(Tensor.__sub__, other)

    def __mul__(self, other):
        return self._op(Tensor.__mul__, other)

    def __rmul__(self, other):
        return self._op(Tensor.__mul__, other)

    def __imul__(self, other):
        return self._op(Tensor.__mul__, other)

    def __truediv__(self, other):
        return self._op(Tensor.__truediv__, other)

    def __rtruediv__(self, other):
        return self._op(Tensor.__rtruediv__, other)

    def __itruediv__(self, other):
        return self._op(Tensor.__truediv__, other)

    def __pow__(self, other):
        return self._op(Tensor.__pow__, other)

    def __rpow__(self, other):
        return self._op(Tensor.__rpow__, other)

    def __gt__(self, other):
        return self._op(Tensor.__gt__, other)

    def __ge__(self, other):
        return self._op(Tensor.__ge__, other)

    def __lt__(self, other):
        return self._op(Tensor.__lt__, other)

    def __le__(self, other):
        return self._op(Tensor.__le__, other)

    def __abs__(self):
        return self._op(Tensor.__abs__)

    def __invert__(self):
        return self._op(Tensor.__invert__)

    def __and__(self, other):
        return self._op(Tensor.__and__, other)

    def __or__(self, other):
        return self._op(Tensor.__or__, other)

    def __neg__(self):
        return self.replace_features(-self.features)

    def __getitem__(self, index):
        return self._op(Tensor.__getitem__, index)

    def __setitem__(self, index, value):
        return self._op(Tensor.__setitem__, index, value)

    def __repr__(self) -> str:
        B, (h, w), C = self.batch_size, self.spatial_shape, self.num_channels
        layout = ", channels_last" if self.channels_last else ""
        return (f"SparseMap(batch={B}, channels={C}{layout}, grid={h}x{w}, sites={self.num_sites} "
                f"({self.num_sites / max(B * h * w, 1):.0%}), dtype={self.dtype}, device={self.device})")
