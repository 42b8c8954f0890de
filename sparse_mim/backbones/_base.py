"""The backbone interface every SparK encoder implements, and format-agnostic helpers.

A backbone is written ONCE, as a dense network of standard layers whose
``forward_features(x)`` returns the four hierarchical maps (strides 4, 8, 16, 32).
`HierarchicalBackbone` turns that into a SparK encoder with three modes:

* ``"dense"``: as built (plain layers); only an all-visible forward is allowed.
* ``"sparse"``: every layer replaced by its sparse twin (`sparse_mim.sparse.sparsify`,
  same Parameter objects, same ``state_dict``); ``forward_features`` then receives a
  `SparseMap` of the visible pixels and only visible sites are ever computed.
* ``"dense_masked"``: the dense layers run SparK's official simulation (zero-filled
  input, every layer output multiplied by the mask at its scale, BN / GRN statistics
  over visible sites): `sparse_mim.sparse.dense_masked`. With ``visible=None`` it is
  the plain dense network.

The forwards of the blocks must therefore work on both a dense NCHW tensor and a
`SparseMap`. Layer calls and ``+`` / ``*`` (scalars, [C] tensors, maps with the same
sites) do; the helpers below cover the rest (layout changes, per-channel scales,
global pooling).
"""
from __future__ import annotations

from typing import Optional

import torch
from timm.layers import DropPath, LayerNorm2d
from timm.layers.grn import GlobalResponseNorm
from torch import Tensor, nn

from ..sparse.tensor import SparseMap, check_visible_mask, upsample_mask
from . import _sparse_conversion

__all__ = ["HierarchicalBackbone", "drop_path_rates", "DropPath", "GlobalResponseNorm", "LayerNorm2d", "to_channels_last",
           "to_channels_first", "scale_channels", "global_avg_pool"]


def drop_path_rates(rate: float, num_blocks: int) -> list[float]:
    """Stochastic-depth rate of each block: linear from 0 to ``rate`` (timm / SparK; device-independent)."""
    if num_blocks <= 1:
        return [0.0] * num_blocks
    return [rate * i / (num_blocks - 1) for i in range(num_blocks)]


# ---------------------------------------------------------------------------- format-agnostic helpers
def to_channels_last(x):
    """NCHW -> NHWC for dense tensors; a `SparseMap` ([N, C] features) is already channels-last."""
    return x if isinstance(x, SparseMap) else x.permute(0, 2, 3, 1)


def to_channels_first(x):
    """NHWC -> NCHW for dense tensors; identity for a `SparseMap`."""
    return x if isinstance(x, SparseMap) else x.permute(0, 3, 1, 2)


def scale_channels(x, scale: Tensor):
    """Multiply every channel by ``scale``: [C] (layer scale) or [B, C] (per-sample, e.g. SE gates)."""
    if isinstance(x, SparseMap):
        if scale.dim() == 1:
            return x * scale
        return x.replace_features(x.features * scale[x.batch_index])
    if scale.dim() == 1:
        return x * scale.view(1, -1, 1, 1)
    return x * scale[:, :, None, None]


def global_avg_pool(x) -> Tensor:
    """[B, C] mean over the *visible* sites of each sample (SE blocks, custom heads).

    Sparse: per-sample mean of the rows. Dense: under the dense-masked simulation the
    hidden sites are zero, so the mean over visible sites is the spatial sum divided by
    the number of visible sites at this scale (read from the active mask); without an
    active mask it is the plain spatial mean.
    """
    if isinstance(x, SparseMap):
        B, C = x.batch_size, x.num_channels
        sums = x.features.new_zeros(B, C).index_add_(0, x.batch_index, x.features)
        return sums / x.sites_per_sample.clamp_min(1).to(sums.dtype)[:, None]
    mask = _current_mask_at(x.shape[-2:])
    if mask is None:
        return x.mean((2, 3))
    # per-site layers (LayerNorm, Linear biases) may leave junk at hidden sites: mask before summing
    mask = mask.to(x.dtype)
    return (x * mask[:, None]).sum((2, 3)) / mask.flatten(1).sum(1).clamp_min(1)[:, None]


def _current_mask_at(hw) -> Optional[Tensor]:
    """The dense-masked simulation's active mask [B, h, w] at spatial size ``hw`` (None outside one)."""
    return _sparse_conversion.current_mask(tuple(hw))


# ---------------------------------------------------------------------------- the interface
class HierarchicalBackbone(nn.Module):
    """Base class of SparK encoders (built-in and custom).

    Subclasses set ``self.channels`` (4 ints, stride 4 first) and
    ``self.downsample_ratio`` (32) in ``__init__``, build their layers from standard
    dense modules, and implement ``forward_features(x) -> [4 maps]``. Subclasses must
    not override ``forward``.
    """

    downsample_ratio: int = 32
    channels: list[int]
    mode: str = "dense"  # "dense" (as built, unconverted), "sparse" or "dense_masked"

    def forward_features(self, x) -> list:
        raise NotImplementedError(f"{type(self).__name__} must implement forward_features(x) -> list of 4 maps")

    # SparK's custom-backbone names, for users porting a net written for the official code.
    def get_downsample_ratio(self) -> int:
        return self.downsample_ratio

    def get_feature_map_channels(self) -> list[int]:
        return list(self.channels)

    # ------------------------------------------------------------------ conversion
    def to_sparse(self) -> "HierarchicalBackbone":
        """Swap every layer for its sparse twin, in place (parameters are shared, names unchanged)."""
        if self.mode != "sparse":
            _sparse_conversion.sparsify(self)
            self.mode = "sparse"
        return self

    def to_dense_masked(self) -> "HierarchicalBackbone":
        """Run as SparK's dense-masked simulation (only valid on a model that was never sparsified)."""
        if self.mode == "sparse":
            raise RuntimeError("this backbone was converted to sparse layers in place; build a new one with "
                               "create_backbone(name, sparse=False) and load_state_dict(sparse_model.state_dict())")
        _sparse_conversion.dense_masked(self)
        self.mode = "dense_masked"
        return self

    @property
    def sparse(self) -> bool:
        """True once converted to sparse layers (SparK reads this to pick the encoder path)."""
        return self.mode == "sparse"

    # ------------------------------------------------------------------ forward
    def check_inputs(self, images: Tensor, visible: Optional[Tensor]) -> Tensor:
        """Validate shapes; returns the visible patch mask (all True when ``visible`` is None)."""
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise ValueError(f"images must be a [B, C, H, W] tensor, got "
                             f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
        B, _, H, W = images.shape
        r = self.downsample_ratio
        if H % r or W % r:
            raise ValueError(f"image size {H}x{W} is not divisible by the backbone's downsample ratio {r}: "
                             f"resize or crop to multiples of {r} (e.g. {max(H // r, 1) * r}x{max(W // r, 1) * r})")
        if visible is None:
            return torch.ones(B, H // r, W // r, dtype=torch.bool, device=images.device)
        if isinstance(visible, Tensor) and visible.dim() == 4 and visible.shape[1] == 1:
            visible = visible[:, 0]  # accept the official SparK layout [B, 1, h, w]
        if isinstance(visible, Tensor) and tuple(visible.shape) != (B, H // r, W // r):
            raise ValueError(f"visible mask has shape {tuple(visible.shape)}, expected (B, H/{r}, W/{r}) = "
                             f"{(B, H // r, W // r)} for images of shape {tuple(images.shape)}")
        check_visible_mask(visible, H, W, batch_size=B, device=images.device)
        return visible

    def forward(self, images: Tensor, visible: Optional[Tensor] = None, return_sparse: bool = False) -> list:
        """Encode the visible patches of ``images``.

        Args:
            images: [B, C, H, W], H and W multiples of ``downsample_ratio``.
            visible: bool [B, H/32, W/32] patch mask (True = visible); None = all visible.
            return_sparse: sparse mode only: return `SparseMap`s instead of dense maps.

        Returns:
            4 maps at strides 4, 8, 16, 32 (small stride first): dense [B, C_i, H/s, W/s]
            with zeros at hidden sites, or `SparseMap`s.
        """
        all_visible = visible is None
        visible = self.check_inputs(images, visible)
        if self.mode == "sparse":
            features = self.forward_features(SparseMap.from_dense(images, visible))
            self._check_outputs(features, images)
            return features if return_sparse else [f.dense() for f in features]
        if return_sparse:
            raise ValueError("return_sparse=True needs a sparse backbone (create_backbone(name, sparse=True))")
        if self.mode == "dense":
            if not all_visible:
                raise RuntimeError(f"{type(self).__name__} has plain dense layers, which cannot apply a patch mask: "
                                   "convert it first with .to_sparse() or .to_dense_masked() (create_backbone does)")
            features = self.forward_features(images)
            self._check_outputs(features, images)
            return features
        # The dense-masked layers need a mask even when all patches are visible (then it is the
        # plain dense network, e.g. the all-visible reference).
        factor = images.shape[-1] // visible.shape[-1]
        with _sparse_conversion.active_mask(visible):
            if not all_visible:
                images = images * upsample_mask(visible, factor).unsqueeze(1).to(images.dtype)
            features = self.forward_features(images)
            if not all_visible:
                features = [f * upsample_mask(visible, f.shape[-1] // visible.shape[-1]).unsqueeze(1).to(f.dtype)
                            for f in features]
        self._check_outputs(features, images)
        return features

    def _check_outputs(self, features: list, images: Tensor) -> None:
        n = len(self.channels)
        if len(features) != n:
            raise RuntimeError(f"{type(self).__name__}.forward_features returned {len(features)} maps, "
                               f"its .channels lists {n}")
        H = images.shape[-2]
        for i, (f, c) in enumerate(zip(features, self.channels)):
            stride = self.downsample_ratio // 2 ** (n - 1 - i)
            h, ch = (f.spatial_shape[0], f.num_channels) if isinstance(f, SparseMap) else (f.shape[-2], f.shape[1])
            if ch != c or h * stride != H:
                raise RuntimeError(f"{type(self).__name__}: map {i} has {ch} channels and height {h}; expected "
                                   f"{c} channels at stride {stride} (height {H // stride}) for a {H}-pixel-high "
                                   "input (maps must come small stride first, each stride twice the previous)")
