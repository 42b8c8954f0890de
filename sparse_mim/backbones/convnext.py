"""ConvNeXt V1 and V2 (atto ... large) as SparK encoders, in timm's parameter names.

Papers: "A ConvNet for the 2020s" (Liu et al., CVPR 2022) and "ConvNeXt V2:
Co-designing and Scaling ConvNets with Masked Autoencoders" (Woo et al., CVPR 2023).
Layout and names follow timm's ``convnext.py`` exactly (``stem.0/1``,
``stages.i.downsample.0/1``, ``stages.i.blocks.j.{gamma, conv_dw, norm, mlp.fc1,
mlp.grn, mlp.fc2}``, ``head.norm``), including timm's per-size choice of the MLP form:
atto / femto / pico / nano use 1x1 convs + LayerNorm2d (``conv_mlp``, weights
[4C, C, 1, 1]); tiny and larger use channels-last ``nn.Linear`` + ``nn.LayerNorm``
(weights [4C, C]). So ``state_dict()`` loads with ``strict=True`` into
``timm.create_model(<same name>, num_classes=0)``. V2 = GRN in the MLP, no layer scale.

``head.norm`` is timm's final norm, which the num_classes=0 timm model keeps. A SparK
encoder never uses it (the decoder reads the 4 stage maps), so it is kept only for
weight exchange and is *frozen* (requires_grad=False: no unused-parameter error under
DDP, no optimizer update). The official SparK files have no final norm; loading them
leaves it at identity, exactly as timm does for FCMAE weights.

Block forwards are format-agnostic (see `_base.to_channels_last`): the same code runs
on dense NCHW tensors and on `SparseMap`s, whose features are already channels-last.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from torch import nn

from ._base import (DropPath, GlobalResponseNorm, HierarchicalBackbone, LayerNorm2d, drop_path_rates, scale_channels,
                    to_channels_first, to_channels_last)
from ._registry import register_backbone

__all__ = ["ConvNeXtBlock", "ConvNeXtStage", "ConvNeXt", "CONVNEXT_SIZES"]

# size -> (depths, dims, conv_mlp, default drop-path rate for SparK pre-training)
CONVNEXT_SIZES = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320), True, 0.0),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384), True, 0.0),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512), True, 0.0),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640), True, 0.05),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768), False, 0.1),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768), False, 0.2),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024), False, 0.3),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536), False, 0.4),
}


class ConvNeXtMlp(nn.Module):
    """fc1 -> GELU -> (GRN) -> fc2; 1x1 convs on NCHW (``conv_mlp``) or Linear on channels-last."""

    def __init__(self, dim: int, hidden: int, conv_mlp: bool, use_grn: bool):
        super().__init__()
        if conv_mlp:
            self.fc1 = nn.Conv2d(dim, hidden, kernel_size=1)
            self.fc2 = nn.Conv2d(hidden, dim, kernel_size=1)
        else:
            self.fc1 = nn.Linear(dim, hidden)
            self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()
        self.grn = GlobalResponseNorm(hidden, eps=1e-6, channels_last=not conv_mlp) if use_grn else None

    def forward(self, x):
        x = self.act(self.fc1(x))
        if self.grn is not None:
            x = self.grn(x)
        return self.fc2(x)


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise conv -> LN -> MLP (x4) -> layer scale -> drop-path + shortcut."""

    def __init__(self, dim: int, drop_path: float = 0.0, ls_init_value: Optional[float] = 1e-6,
                 conv_mlp: bool = False, use_grn: bool = False, mlp_ratio: int = 4):
        super().__init__()
        self.use_conv_mlp = conv_mlp
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = LayerNorm2d(dim, eps=1e-6) if conv_mlp else nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ConvNeXtMlp(dim, mlp_ratio * dim, conv_mlp, use_grn)
        self.gamma = nn.Parameter(torch.full((dim,), ls_init_value)) if ls_init_value is not None else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.conv_dw(x)
        if self.use_conv_mlp:
            x = self.mlp(self.norm(x))
        else:
            x = to_channels_first(self.mlp(self.norm(to_channels_last(x))))
        if self.gamma is not None:
            x = scale_channels(x, self.gamma)
        return self.drop_path(x) + shortcut


class ConvNeXtStage(nn.Module):
    """Optional downsample (LayerNorm2d + 2x2/2 conv) followed by ``depth`` blocks."""

    def __init__(self, in_chs: int, out_chs: int, depth: int, drop_rates: list[float], downsample: bool,
                 **block_kwargs):
        super().__init__()
        if downsample:
            self.downsample = nn.Sequential(LayerNorm2d(in_chs, eps=1e-6),
                                            nn.Conv2d(in_chs, out_chs, kernel_size=2, stride=2))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[ConvNeXtBlock(out_chs, drop_rates[j], **block_kwargs) for j in range(depth)])

    def forward(self, x):
        return self.blocks(self.downsample(x))


class _Head(nn.Module):
    """Holds timm's ``head.norm`` for weight exchange only (never called, frozen)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.norm.requires_grad_(False)


class ConvNeXt(HierarchicalBackbone):
    """ConvNeXt trunk: 4x4/4 patchify stem + LayerNorm2d, four stages; returns the 4 stage maps."""

    def __init__(self, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), drop_path_rate: float = 0.0,
                 ls_init_value: Optional[float] = 1e-6, conv_mlp: bool = False, use_grn: bool = False,
                 in_chans: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0], eps=1e-6))
        rates = drop_path_rates(drop_path_rate, sum(depths))
        starts = [sum(depths[:i]) for i in range(4)]
        self.stages = nn.Sequential(*[
            ConvNeXtStage(dims[max(i - 1, 0)], dims[i], depths[i], rates[starts[i]:starts[i] + depths[i]], downsample=i > 0,
                          ls_init_value=ls_init_value, conv_mlp=conv_mlp, use_grn=use_grn)
            for i in range(4)])
        self.head = _Head(dims[-1])
        self.depths, self.dims = tuple(depths), tuple(dims)
        self.conv_mlp, self.use_grn = conv_mlp, use_grn
        self.drop_path_rate = drop_path_rate
        self.channels = list(dims)
        self.downsample_ratio = 32
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward_features(self, x) -> list:
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


def _convnext(size: str, version: int, drop_path_rate: Optional[float] = None,
              depths: Optional[tuple[int, int, int, int]] = None, **kwargs) -> ConvNeXt:
    """``depths`` overrides the blocks per stage (tests / experiments: the weights then differ from the name's)."""
    size_depths, dims, conv_mlp, default_rate = CONVNEXT_SIZES[size]
    depths = tuple(depths or size_depths)
    rate = default_rate if drop_path_rate is None else drop_path_rate
    if version == 2:  # GRN, no layer scale (as in timm's convnextv2_*)
        kwargs.setdefault("use_grn", True)
        kwargs.setdefault("ls_init_value", None)
    return ConvNeXt(depths, dims, drop_path_rate=rate, conv_mlp=kwargs.pop("conv_mlp", conv_mlp), **kwargs)


for _size in CONVNEXT_SIZES:
    register_backbone(f"convnext_{_size}", partial(_convnext, _size, 1), family="convnext")
    register_backbone(f"convnextv2_{_size}", partial(_convnext, _size, 2), family="convnext")
