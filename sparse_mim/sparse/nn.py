"""Sparse layers: `SparseMap` in, `SparseMap` out, parameters named and shaped like their dense twins.

Each class subclasses its dense twin (``SparseConv2d(nn.Conv2d)``, ...), so it
holds exactly the same parameters and buffers under the same names, weights
in torch layout [out, in, kh, kw]; a sparse model's ``state_dict`` loads into
the dense model with ``strict=True``. `sparsify` (convert.py) turns a dense
model into its sparse twin in place by switching each layer's class, so the
Parameter objects themselves are shared.

Every layer also accepts a dense tensor and then runs its dense twin (the
fully connected convs of a squeeze-excitation gate see a [B, C, 1, 1] tensor),
so heads, gates and stems may mix both. A configuration without a sparse
kernel (a conv or pool whose padding leaves the patch grid, reflect padding,
``return_indices``) runs through the exact dense fallback of `dispatch`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import dispatch, kernels, report
from . import functional as SF
from .tensor import SparseMap

__all__ = [
    "SparseConv2d", "SparseBatchNorm2d", "SparseSyncBatchNorm", "SparseLayerNorm", "SparseLayerNorm2d", "SparseGRN",
    "SparseMaxPool2d", "SparseAvgPool2d", "SparseDropPath", "SparseLinear", "SparseIdentity", "SparseReLU", "SparseReLU6", "SparseGELU",
    "SparseSiLU", "SparseDropout", "sparse_global_avg_pool", "SparseElementwise", "elementwise_twin",
]


def _module_fallback(layer: nn.Module, x: SparseMap, dense_forward):
    """Run ``dense_forward`` (the dense layer's own forward) through the exact fallback of `dispatch`."""
    def module_forward(t):
        return dense_forward(layer, t)
    module_forward.__name__ = type(layer).__mro__[1].__name__
    return dispatch.fallback(module_forward, (x,), {}, x)


def _require_sparse(x, layer: nn.Module) -> SparseMap:
    if not isinstance(x, SparseMap):
        raise TypeError(f"{type(layer).__name__} expects a SparseMap, got {type(x).__name__}; wrap images with "
                        "SparseMap.from_dense(images, visible) (or use the dense-masked twin for dense tensors)")
    return x


class SparseConv2d(nn.Conv2d):
    """``nn.Conv2d`` on the active sites.

    stride 1 = submanifold (output sites = input sites); strided = output
    restricted to the coarser mask, canonical order; 1x1 stride 1 = linear map;
    ``groups == in_channels == out_channels`` = depthwise. Padding must keep the
    patch grid ('same' for odd k, 0 when kernel == stride).
    """

    def forward(self, x):
        if not isinstance(x, SparseMap):
            out = super().forward(x)
            report.record("conv2d", out.numel() * self.weight[0].numel(), "dense")
            return out
        if self.padding_mode == "zeros" and not x.channels_last:
            try:
                return kernels.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                      self.groups)
            except ValueError as e:
                if not kernels.off_grid(e):
                    raise
        return _module_fallback(self, x, nn.Conv2d.forward)


class SparseConv2dSameMixin:
    """Sparse twin of timm's ``Conv2dSame`` (TF 'same' padding): `kernels.conv2d_same` on a sparse map."""

    def forward(self, x):
        if isinstance(x, SparseMap) and self.padding_mode == "zeros" and not x.channels_last:
            try:
                return kernels.conv2d_same(x, self.weight, self.bias, self.stride, self.dilation, self.groups)
            except ValueError as e:
                if not kernels.off_grid(e):
                    raise
        return super().forward(x)  # dense input, or through torch dispatch (pad + conv: the exact fallback)


_TWINS: dict[type, type] = {}


def _twin_class(cls: type, mixin: type, what: str) -> type:
    """``class Sparse<cls>(mixin, cls)``: created once per dense class, cached, and importable by name from
    this module, so models holding it can be pickled / deep-copied; a class that already is a twin is kept."""
    if issubclass(cls, mixin):
        return cls
    twin = _TWINS.get(cls)
    if twin is None:
        name = f"Sparse{cls.__name__}"
        if name in globals():  # two dense classes with one name (torch's and timm's GELU): keep names unique
            name = f"Sparse{cls.__module__.replace('.', '_')}_{cls.__name__}"
        twin = type(name, (mixin, cls), {"__doc__": f"Sparse twin of {cls.__module__}.{cls.__qualname__} ({what}).",
                                         "__module__": __name__})
        _TWINS[cls] = twin
        globals()[name] = twin
    return twin


def conv_same_twin(cls: type) -> type:
    """The sparse twin class of a TF-'same' conv class (created once, cached, importable by name)."""
    return _twin_class(cls, SparseConv2dSameMixin, "the conv's padding applied on the sparse map")


class _SparseBatchNormMixin:
    """BatchNorm over the [N, C] visible rows (statistics over visible sites only)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 4):
            raise ValueError(f"expected [N, C] sparse features or a 4-D tensor, got shape {tuple(input.shape)}")

    def forward(self, x):
        if isinstance(x, SparseMap):
            return x.replace_features(super().forward(x.features))
        return super().forward(x)


class SparseBatchNorm2d(_SparseBatchNormMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with visible-site statistics (same parameters and buffers)."""


class SparseSyncBatchNorm(_SparseBatchNormMixin, nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` with visible-site statistics across all ranks (sites, not images, are counted)."""


class SparseLayerNorm(nn.LayerNorm):
    """Channels-last LayerNorm on the features (dense tensors pass through ``nn.LayerNorm``)."""

    def forward(self, x):
        if isinstance(x, SparseMap):
            return SF.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return super().forward(x)


class SparseLayerNorm2d(nn.LayerNorm):
    """Twin of timm's ``LayerNorm2d`` (LayerNorm over C of an NCHW map): on sparse features it is a plain LN."""

    def forward(self, x):
        if isinstance(x, SparseMap):
            return SF.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = x.permute(0, 2, 3, 1)
        x = nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class SparseGRN(nn.Module):
    """ConvNeXt-V2 Global Response Norm per sample over its visible sites (timm names ``weight``, ``bias``)."""

    def __init__(self, dim: int, eps: float = 1e-6, channels_last: bool = True):
        super().__init__()
        self.eps = eps
        self.channels_last = channels_last
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: SparseMap) -> SparseMap:
        x = _require_sparse(x, self)
        return SF.global_response_norm(x, self.weight, self.bias, self.eps)


class SparseMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` on the zero-filled map, computed at the active (coarse) sites."""

    def forward(self, x):
        if not isinstance(x, SparseMap):
            return super().forward(x)
        if not self.return_indices and not x.channels_last:
            try:
                return kernels.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation,
                                          self.ceil_mode)
            except ValueError as e:
                if not kernels.off_grid(e):
                    raise
        return _module_fallback(self, x, nn.MaxPool2d.forward)


class SparseAvgPool2d(nn.AvgPool2d):
    """``nn.AvgPool2d`` on the zero-filled map (hidden sites read 0 and count), at the active sites."""

    def forward(self, x):
        if not isinstance(x, SparseMap):
            return super().forward(x)
        if not x.channels_last:
            try:
                return kernels.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                                          self.count_include_pad, self.divisor_override)
            except ValueError as e:
                if not kernels.off_grid(e):
                    raise
        return _module_fallback(self, x, nn.AvgPool2d.forward)


class SparseDropPath(nn.Module):
    """Per-sample stochastic depth keyed on each row's batch index (same RNG draws as timm's DropPath)."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x):
        if isinstance(x, SparseMap):
            return SF.drop_path(x, self.drop_prob, self.training, self.scale_by_keep)
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        r = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        if keep > 0 and self.scale_by_keep:
            r.div_(keep)
        return x * r

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"


def sparse_global_avg_pool(x: SparseMap) -> Tensor:
    """Per-sample mean over visible sites: [B, C] (e.g. for SE blocks: ``x * fc(sparse_global_avg_pool(x))``)."""
    return SF.global_avg_pool(x)


# ---------------------------------------------------------------------------------------------------- element-wise
class SparseElementwise:
    """Mixin: apply the dense layer's own forward to the [N, C] features of a SparseMap.

    Valid for layers acting on each site independently along the channel dim
    (activations, Dropout, Identity, channels-last Linear / LayerNorm).
    """

    def forward(self, x, *args, **kwargs):
        if isinstance(x, SparseMap):
            out = super().forward(x.features, *args, **kwargs)
            if isinstance(self, nn.Linear):
                report.record("linear", out.numel() * self.in_features, "sparse")
            return x.replace_features(out)
        out = super().forward(x, *args, **kwargs)
        if isinstance(self, nn.Linear):
            report.record("linear", out.numel() * self.in_features, "dense")
        return out


def elementwise_twin(cls: type) -> type:
    """The sparse twin class of an element-wise layer class (created once, cached)."""
    return _twin_class(cls, SparseElementwise, "applied to the features")


SparseLinear = elementwise_twin(nn.Linear)
SparseIdentity = elementwise_twin(nn.Identity)
SparseReLU = elementwise_twin(nn.ReLU)
SparseReLU6 = elementwise_twin(nn.ReLU6)
SparseGELU = elementwise_twin(nn.GELU)
SparseSiLU = elementwise_twin(nn.SiLU)
SparseDropout = elementwise_twin(nn.Dropout)
